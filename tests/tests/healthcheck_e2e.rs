//! Health-check node ports end to end, with each source (the manifest directory, the test API
//! server through the real `kube` client): a `LoadBalancer` Service with
//! `externalTrafficPolicy: Local` and `healthCheckNodePort: 32000`, one ready endpoint on each
//! node; each node's agent serves the port on the node's addresses, asked from the external
//! client (outside the cluster, on the underlay) as a load balancer's probe would:
//!
//! - node1 and node2 each answer 200 with `localEndpoints` 1, over IPv4 and IPv6 (one
//!   dual-stack listener), headers and body as kube-proxy's (`serviceProxyHealthy: true`,
//!   `X-Load-Balancing-Endpoint-Weight: 1`);
//! - node1's endpoint turns not ready (the slice file rewritten): node1 answers 503 with
//!   `localEndpoints` 0 within the bound, node2 still 200;
//! - the Service is deleted: the port closes on both nodes (connection refused);
//! - with `--nodeport-addresses` (IPv4 prefixes), the ports listen on those node addresses
//!   only (IPv6 refused) and follow an address added to and removed from node1's uplink.
//!
//! Needs root and the agent binary (`cargo build -p svc-agent`): fails, never skips, without
//! them. Runs with `SVC_TEST_SOCKET_LB=all` and `=host-only` alike.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use svc_tests::{
    apiserver::{ClusterApi, Kind, Options},
    k8s::{self, Endpoint, EndpointSlice, Protocol, Service},
    netns::Netns,
    testbed::{TestBed, vip4},
};

/// The Service's `healthCheckNodePort`.
const HEALTH_PORT: u16 = 32000;
/// Its `nodePort`.
const NODE_PORT: u16 = 30080;
const SERVICE_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
/// Bound on every connect and read.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a change of the directory may take to reach the health-check port.
const CHANGE_BOUND: Duration = Duration::from_secs(3);

/// One answer: status code, headers (lower-case names) and body.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 GET from inside `ns`; `None` when the connection is refused (nothing
/// listens).
fn get(ns: &Netns, addr: SocketAddr) -> anyhow::Result<Option<Reply>> {
    ns.run(move || {
        let mut stream = match TcpStream::connect_timeout(&addr, IO_TIMEOUT) {
            Ok(stream) => stream,
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("connecting to {addr}")),
        };
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        let host = addr.to_string();
        write!(
            stream,
            "GET /healthz HTTP/1.1\r\nHost: {host}\r\nUser-Agent: lb-probe\r\nConnection: close\r\n\r\n"
        )?;
        let mut out = String::new();
        stream.read_to_string(&mut out)?;
        let (head, body) = out
            .split_once("\r\n\r\n")
            .with_context(|| format!("no header end in {out:?}"))?;
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.get(9..12))
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("no status line in {out:?}"))?;
        let headers = lines
            .filter_map(|l| l.split_once(": "))
            .map(|(k, v)| (k.to_ascii_lowercase(), v.to_owned()))
            .collect();
        Ok(Some(Reply {
            status,
            headers,
            body: body.to_owned(),
        }))
    })
}

/// Whether `e` is a connection reset (or the peer closing mid-answer).
fn is_reset(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
            )
        })
    })
}

/// kube-proxy's body for `default/web` (tab-indented, no final newline).
fn body(local_endpoints: usize) -> String {
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"web\"\n\t}},\n\t\
         \"localEndpoints\": {local_endpoints},\n\t\"serviceProxyHealthy\": true\n}}"
    )
}

/// Where the agents read the objects.
enum Feed {
    /// The manifest directory (`--from-dir`).
    Dir,
    /// The test API server in node1's namespace (`--kubeconfig`).
    Api(Box<ClusterApi>),
}

struct Cluster {
    feed: Feed,
    bed: TestBed,
}

impl std::ops::Deref for Cluster {
    type Target = TestBed;
    fn deref(&self) -> &TestBed {
        &self.bed
    }
}

impl Cluster {
    /// The `ports` of the Service (for its slice).
    fn service() -> Service {
        Service::cluster_ip("web", &[vip4(140)]).port(
            "http",
            Protocol::Tcp,
            SERVICE_PORT,
            BACKEND_PORT,
        )
    }

    /// The Service as the API server would hold it: `LoadBalancer`, `externalTrafficPolicy:
    /// Local`, a node port and the health-check node port.
    fn service_yaml() -> String {
        format!(
            "apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
spec:
  clusterIP: {vip}
  clusterIPs:
  - {vip}
  externalTrafficPolicy: Local
  healthCheckNodePort: {HEALTH_PORT}
  internalTrafficPolicy: Cluster
  ipFamilies:
  - IPv4
  ipFamilyPolicy: SingleStack
  ports:
  - name: http
    nodePort: {NODE_PORT}
    port: {SERVICE_PORT}
    protocol: TCP
    targetPort: {BACKEND_PORT}
  sessionAffinity: None
  type: LoadBalancer
status:
  loadBalancer: {{}}
",
            vip = vip4(140)
        )
    }

    /// The slice: web-0 (node1) ready or not, web-1 (node2) ready.
    fn slice_yaml(&self, web0_ready: bool) -> String {
        let topo = &self.bed.topo;
        let web0 = Endpoint {
            ready: web0_ready,
            serving: web0_ready,
            ..Endpoint::ready(topo, self.pod("web-0"), false)
        };
        EndpointSlice::new("web", false)
            .ports_of(&Self::service(), &[])
            .endpoint(web0)
            .endpoint(Endpoint::ready(topo, self.pod("web-1"), false))
            .to_yaml()
    }

    /// A cluster with web-0 on node1 and web-1 on node2, its agents following `api` (the test
    /// API server) or the directory, the Service and its slice stored, the agents started.
    fn start(api: bool) -> Self {
        Self::start_with(api, None)
    }

    /// [`start`](Self::start); with `nodeport_addresses`, the directory's agents run with
    /// that `--nodeport-addresses`.
    fn start_with(api: bool, nodeport_addresses: Option<&str>) -> Self {
        let bed = TestBed::new(&[(0, "web-0"), (1, "web-1")]);
        let feed = if api {
            let api = ClusterApi::start(&bed.topo, Options::default())
                .expect("starting the test API server");
            Feed::Api(Box::new(api))
        } else {
            Feed::Dir
        };
        let mut c = Self { feed, bed };
        c.store(true);
        match &c.feed {
            Feed::Dir => match nodeport_addresses {
                Some(cidrs) => {
                    let env = format!("SVC_NODEPORT_ADDRESSES={cidrs}");
                    c.bed.start_agents_under(&["env".as_ref(), env.as_ref()]);
                }
                None => c.bed.start_agents(),
            },
            Feed::Api(api) => {
                for node in c.bed.topo.nodes() {
                    let agent = k8s::Agent::start_kube(&c.bed.agent_bin, node, &api.kubeconfig)
                        .unwrap_or_else(|e| panic!("starting svc-agent on {}: {e:#}", node.name));
                    c.bed.agents.push(agent);
                }
                c.step(&format!(
                    "svc-agent running on node1 and node2 (following the API server at {})",
                    api.server.url()
                ));
            }
        }
        c
    }

    /// Stores the Service and its slice (web-0 ready or not).
    fn store(&self, web0_ready: bool) {
        let docs = [Self::service_yaml(), self.slice_yaml(web0_ready)];
        match &self.feed {
            Feed::Dir => self
                .bed
                .manifests
                .write("svc.yaml", &k8s::documents(&docs))
                .unwrap_or_else(|e| panic!("writing svc.yaml: {e:#}")),
            Feed::Api(api) => {
                api.server
                    .apply_yaml(&k8s::documents(&docs))
                    .unwrap_or_else(|e| panic!("storing the Service and its slice: {e:#}"));
            }
        }
    }

    /// Deletes the Service (its slice stays, as it may for a moment in a cluster).
    fn delete_service(&self) {
        match &self.feed {
            Feed::Dir => self
                .bed
                .manifests
                .write("svc.yaml", &self.slice_yaml(false))
                .unwrap_or_else(|e| panic!("writing svc.yaml: {e:#}")),
            Feed::Api(api) => {
                api.server
                    .delete(Kind::Service, k8s::NAMESPACE, "web")
                    .expect("the Service was stored");
            }
        }
    }

    /// Stops the agents (cleanly, without warnings) while the API server still serves, then
    /// the rest.
    fn finish(self) {
        let Self { feed, bed } = self;
        bed.finish();
        drop(feed);
    }

    /// Node `node`'s health-check port at its underlay address of `ipv6`'s family.
    fn port_of(&self, node: usize, ipv6: bool) -> SocketAddr {
        let n = self.topo.node(node);
        let ip: IpAddr = if ipv6 {
            n.underlay_v6.into()
        } else {
            n.underlay_v4.into()
        };
        SocketAddr::new(ip, HEALTH_PORT)
    }

    /// Asks node `node`'s port from the external client until `done` holds for the answer
    /// (`None`: refused), at most [`CHANGE_BOUND`]; returns the answer and how long it took.
    fn poll(
        &self,
        node: usize,
        ipv6: bool,
        what: &str,
        done: impl Fn(&Option<Reply>) -> bool,
    ) -> (Option<Reply>, Duration) {
        let addr = self.port_of(node, ipv6);
        let external = &self.topo.external().ns;
        let started = Instant::now();
        loop {
            let reply = match get(external, addr) {
                Ok(reply) => reply,
                // A connection the agent closed with its port (the Service went) while this
                // request was on it: reset. Ask again; the bound below still holds.
                Err(e) if is_reset(&e) && started.elapsed() < CHANGE_BOUND => {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Err(e) => panic!("GET {addr} from the external client: {e:#}"),
            };
            if done(&reply) {
                return (reply, started.elapsed());
            }
            assert!(
                started.elapsed() < CHANGE_BOUND,
                "{what}: {addr} still answers {reply:?} after {CHANGE_BOUND:?}; agent log:\n{}",
                self.agent(node).log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Node `node` answers `status` with `local` local endpoints (polled, bounded).
    fn expect(&self, node: usize, ipv6: bool, status: u16, local: usize, what: &str) {
        let (reply, took) = self.poll(node, ipv6, what, |r| {
            r.as_ref()
                .is_some_and(|r| r.status == status && r.body == body(local))
        });
        let reply = reply.expect("an answer");
        assert_eq!(reply.header("content-type"), Some("application/json"));
        assert_eq!(reply.header("x-content-type-options"), Some("nosniff"));
        assert_eq!(
            reply.header("x-load-balancing-endpoint-weight"),
            Some(local.to_string().as_str())
        );
        self.step(&format!(
            "{what}: {} answers {status}, localEndpoints {local} (after {:.0} ms)",
            self.port_of(node, ipv6),
            took.as_secs_f64() * 1e3
        ));
    }
}

/// The steps of the [module docs](self), with either source.
fn run(api: bool) {
    let mut c = Cluster::start(api);
    for node in 0..2 {
        for ipv6 in [false, true] {
            c.expect(
                node,
                ipv6,
                200,
                1,
                &format!("node{} with its ready endpoint", node + 1),
            );
        }
    }

    let before: Vec<usize> = c.bed.agents.iter().map(k8s::Agent::syncs).collect();
    c.store(false);
    c.expect(0, false, 503, 0, "web-0 (node1) not ready");
    // node2 has applied the same change, and still answers 200.
    for (agent, before) in c.bed.agents.iter_mut().zip(before) {
        agent
            .wait_syncs(before + 1, CHANGE_BOUND)
            .unwrap_or_else(|e| panic!("the readiness change: {e:#}"));
    }
    c.expect(1, false, 200, 1, "web-0 (node1) not ready, node2 synced");

    c.delete_service();
    for node in 0..2 {
        let (_, took) = c.poll(node, false, "the Service deleted", Option::is_none);
        c.step(&format!(
            "the Service deleted: {} refuses connections (after {:.0} ms)",
            c.port_of(node, false),
            took.as_secs_f64() * 1e3
        ));
    }
    c.finish();
}

/// With `--nodeport-addresses`, as kube-proxy: the ports listen on the node addresses it picks
/// only (here IPv4), and follow them: an address added to node1's uplink inside the prefixes
/// gets node1's port too (and serves the node port), and loses both when it goes.
#[test]
fn health_check_node_ports_listen_on_the_nodeport_addresses_only() {
    let extra = std::net::Ipv4Addr::new(198, 18, 203, 1);
    let cidrs = format!(
        "{}/32,{}/32,198.18.203.0/24",
        svc_tests::netns::node_underlay_v4(0),
        svc_tests::netns::node_underlay_v4(1)
    );
    let c = Cluster::start_with(false, Some(&cidrs));
    for node in 0..2 {
        c.expect(node, false, 200, 1, &format!("node{} over IPv4", node + 1));
        let v6 = c.port_of(node, true);
        let refused = get(&c.topo.external().ns, v6).unwrap_or_else(|e| panic!("GET {v6}: {e:#}"));
        assert!(
            refused.is_none(),
            "{v6} is outside --nodeport-addresses, yet answers: {refused:?}"
        );
        c.step(&format!("{v6}: refused (outside --nodeport-addresses)"));
    }

    let node1 = c.topo.node(0);
    node1
        .ns
        .ip([
            "addr",
            "add",
            &format!("{extra}/32"),
            "dev",
            svc_tests::netns::ETH0,
        ])
        .expect("adding an address to node1's uplink");
    c.topo
        .external()
        .ns
        .ip([
            "route",
            "add",
            &format!("{extra}/32"),
            "via",
            &node1.underlay_v4.to_string(),
        ])
        .expect("routing it to node1");
    let addr = SocketAddr::new(extra.into(), HEALTH_PORT);
    let started = Instant::now();
    loop {
        match get(&c.topo.external().ns, addr) {
            Ok(Some(reply)) if reply.status == 200 && reply.body == body(1) => break,
            Ok(_) => {}
            Err(e) if is_reset(&e) => {}
            Err(e) => panic!("GET {addr}: {e:#}"),
        }
        assert!(
            started.elapsed() < CHANGE_BOUND,
            "{addr} (added to node1) does not answer within {CHANGE_BOUND:?}; agent log:\n{}",
            c.agent(0).log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let key = format!("{extra}:{NODE_PORT} TCP external");
    assert!(
        c.programmed(0).backends(&key).is_some(),
        "node1 answers health checks on {extra} but does not serve its node port{}",
        c.diag()
    );
    c.step(&format!(
        "{addr}: added to node1's uplink, answers 200 after {:.0} ms (and {key} is served)",
        started.elapsed().as_secs_f64() * 1e3
    ));
    node1
        .ns
        .ip([
            "addr",
            "del",
            &format!("{extra}/32"),
            "dev",
            svc_tests::netns::ETH0,
        ])
        .expect("removing it");
    let started = Instant::now();
    while c.programmed(0).backends(&key).is_some() {
        assert!(
            started.elapsed() < CHANGE_BOUND,
            "node1 still serves {key} after the address went{}",
            c.diag()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The Node's own address still answers (the ports were reopened on what remains).
    c.expect(0, false, 200, 1, "node1 after its extra address went");
    c.finish();
}

#[test]
fn health_check_node_ports_follow_the_directory() {
    run(false);
}

#[test]
fn health_check_node_ports_follow_the_api_server() {
    run(true);
}
