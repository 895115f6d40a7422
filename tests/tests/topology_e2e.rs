//! Topology-aware routing, end to end in standalone mode: two nodes in two zones (their Nodes
//! carry `topology.kubernetes.io/zone`), a Service with `trafficDistribution: PreferClose`
//! over Pods on both; the agents compute the slices with zone hints as the `EndpointSlice`
//! controller would and each node programs its own zone's Pods only, as kube-proxy would.
//!
//! One test, in steps: clients on each node reach only their zone's Pods (IPv4 and IPv6); the
//! Pods of node1's zone go away and node1's clients reach the other zone; one comes back and
//! takes node1's traffic again. Needs root and a built agent (`cargo build -p svc-agent`):
//! fails, never skips, without them. Runs with `SVC_TEST_SOCKET_LB=all` and `=host-only`
//! alike.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use svc_tests::{
    k8s::{self, Agent, Backends, Protocol, Service, frontend_key},
    testbed::{TestBed, family, vip4, vip6},
};

/// Bound on every connect, read and write that is expected to succeed.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the agents may take to apply a change of the directory.
const SYNC_TIMEOUT: Duration = Duration::from_secs(5);
/// The container port the Pods declare (`http`) and serve on.
const HTTP_PORT: u16 = 8080;
/// The Service's port.
const SERVICE_HTTP: u16 = 80;
/// New connections per check.
const REQUESTS: usize = 30;
/// The zones of node1 and node2.
const ZONES: [&str; 2] = ["zone-a", "zone-b"];

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

/// A running, Ready `v1` Pod labelled `app: web` on its node, declaring the `http` port.
fn pod_yaml(bed: &TestBed, name: &str, app: &str) -> String {
    let pod = bed.pod(name);
    let node = bed.node_name(pod);
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
status:
  phase: Running
  podIP: {v4}
  podIPs:
  - ip: {v4}
  - ip: {v6}
  conditions:
  - type: Ready
    status: \"True\"
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

    fn write_pod(&self, name: &str, app: &str) {
        let file = Self::pod_file(name);
        self.bed
            .manifests
            .write(&file, &pod_yaml(&self.bed, name, app))
            .unwrap_or_else(|e| panic!("writing {file}: {e:#}"));
    }

    fn remove_pod(&self, name: &str) {
        let file = Self::pod_file(name);
        self.bed
            .manifests
            .remove(&file)
            .unwrap_or_else(|e| panic!("removing {file}: {e:#}"));
    }

    /// Whether node `node` programs exactly `pods` as the backends of every VIP.
    fn programs(&self, node: usize, vips: &[IpAddr], pods: &[&str]) -> (bool, String) {
        let programmed = self.programmed(node);
        let ok = vips.iter().all(|&vip| {
            let key = frontend_key(SocketAddr::new(vip, SERVICE_HTTP), Protocol::Tcp);
            let want: BTreeSet<String> = pods
                .iter()
                .map(|p| SocketAddr::new(self.pod_ip(p, vip), HTTP_PORT).to_string())
                .collect();
            programmed.backends(&key).as_ref() == Some(&want)
        });
        (ok, programmed.text)
    }

    /// Makes a change (nothing when `change` is `None`), waits until every agent synced after
    /// it and until node `i` programs exactly `want[i]` (bounded).
    fn settle(
        &mut self,
        what: &str,
        change: Option<&dyn Fn(&Self)>,
        vips: &[IpAddr],
        want: [&[&str]; 2],
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
        for (node, pods) in want.iter().enumerate() {
            loop {
                let (ok, text) = self.programs(node, vips, pods);
                if ok {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{what}: node{} does not program {pods:?} within {SYNC_TIMEOUT:?}:\n{text}\
                     agent log:\n{}",
                    node + 1,
                    self.agent(node).log()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.step(&format!(
            "{what}: node1 programs {:?}, node2 {:?} after {:.0} ms",
            want[0],
            want[1],
            t.elapsed().as_secs_f64() * 1e3
        ));
    }

    /// [`REQUESTS`] new TCP connections from pod `client` to every VIP; asserts exactly `pods`
    /// answered (each connection chooses among at most 2 Pods: one is missed with probability
    /// 2 x (1/2)^30 < 2e-9).
    fn check_answered_by(&self, client: &str, vips: &[IpAddr], pods: &[&str], tag: &str) {
        for &vip in vips {
            let dst = SocketAddr::new(vip, SERVICE_HTTP);
            let request_tag = tag.to_owned();
            let tally: BTreeMap<String, usize> = self
                .pod(client)
                .ns
                .run(move || {
                    let mut tally = BTreeMap::new();
                    for i in 0..REQUESTS {
                        let request = format!("{request_tag}-{i}");
                        let answer = k8s::tcp_request(dst, &request, IO_TIMEOUT)?;
                        anyhow::ensure!(
                            answer.from == dst,
                            "{request}: answered from {}, not from {dst}",
                            answer.from
                        );
                        *tally.entry(answer.label).or_default() += 1;
                    }
                    Ok(tally)
                })
                .unwrap_or_else(|e| panic!("{tag}: {client} -> {dst}: {e:#}{}", self.diag()));
            let answered: BTreeSet<&str> = tally.keys().map(String::as_str).collect();
            let want: BTreeSet<&str> = pods.iter().copied().collect();
            self.step(&format!(
                "{tag}: {client} {} {dst}: {REQUESTS} new connections answered by {tally:?}",
                family(vip)
            ));
            assert_eq!(answered, want, "{tag}: {client}: {tally:?}{}", self.diag());
        }
    }
}

#[test]
fn prefer_close_keeps_clients_in_their_zone_and_falls_back_to_the_other() {
    let mut c = Cluster {
        backends: Backends::new(),
        bed: TestBed::new(&[
            (0, "client-a"),
            (0, "web-a0"),
            (0, "web-a1"),
            (1, "client-b"),
            (1, "web-b0"),
        ]),
    };
    // The Nodes, now with their zones.
    let nodes: Vec<String> = c
        .topo
        .nodes()
        .iter()
        .zip(ZONES)
        .map(|(node, zone)| k8s::node_yaml_in_zone(node, Some(zone)))
        .collect();
    c.bed
        .manifests
        .write("nodes.yaml", &k8s::documents(&nodes))
        .expect("writing the Nodes with their zones");
    let vips = [vip4(70), vip6(70)];
    let svc = Service::cluster_ip("web", &vips)
        .port("http", Protocol::Tcp, SERVICE_HTTP, "http")
        .select("app", "web")
        .traffic_distribution("PreferClose");
    c.bed
        .manifests
        .write("web-svc.yaml", &svc.to_yaml())
        .expect("writing web-svc.yaml");
    for name in ["web-a0", "web-a1", "web-b0"] {
        c.write_pod(name, "web");
        let pod = c.pod(name);
        for ip in [IpAddr::from(pod.ipv4), pod.ipv6.into()] {
            c.backends
                .serve(&pod.ns, name, SocketAddr::new(ip, HTTP_PORT))
                .unwrap_or_else(|e| panic!("serving {name} on {ip}: {e:#}"));
        }
    }
    for client in ["client-a", "client-b"] {
        c.write_pod(client, "client");
    }
    c.bed.start_agents();

    c.settle(
        "PreferClose, node1 in zone-a, node2 in zone-b",
        None,
        &vips,
        [&["web-a0", "web-a1"], &["web-b0"]],
    );
    c.check_answered_by("client-a", &vips, &["web-a0", "web-a1"], "zone-a");
    c.check_answered_by("client-b", &vips, &["web-b0"], "zone-b");

    c.settle(
        "zone-a's Pods removed",
        Some(&|c: &Cluster| {
            c.remove_pod("web-a0");
            c.remove_pod("web-a1");
        }),
        &vips,
        [&["web-b0"], &["web-b0"]],
    );
    c.check_answered_by("client-a", &vips, &["web-b0"], "zone-a-empty");
    c.check_answered_by("client-b", &vips, &["web-b0"], "zone-a-empty");

    c.settle(
        "web-a1 back",
        Some(&|c: &Cluster| c.write_pod("web-a1", "web")),
        &vips,
        [&["web-a1"], &["web-b0"]],
    );
    c.check_answered_by("client-a", &vips, &["web-a1"], "zone-a-back");
    c.check_answered_by("client-b", &vips, &["web-b0"], "zone-a-back");

    // node1 said once (not on every pass) why it used every endpoint while zone-a had none.
    let log = c.agent(0).log();
    let said = log
        .matches("no ready endpoint is hinted for this node's zone \"zone-a\"")
        .count();
    assert_eq!(said, 1, "node1's note about the hints, once:\n{log}");
    c.step("node1 logged why it used every endpoint while zone-a had none");

    let Cluster { backends, bed } = c;
    drop(backends);
    bed.finish();
}
