//! The agent following a Kubernetes API server, end to end: the real `svc-agent run
//! --kubeconfig` (its real `kube` client and reflectors) against the test API server
//! (`svc_tests::apiserver`), which listens on node1's underlay address inside node1's
//! namespace, and real traffic from a client pod to the Service VIP.
//!
//! Covered: adds, updates and deletes reaching the maps; a watch dropped mid-stream; a `410`
//! relist that must not remove and re-add (flap) anything unchanged; deletes that happen while
//! the API server is unreachable, removed after it comes back; bad objects reported as Events
//! while everything else stays programmed; and requests that keep being answered while the API
//! server is away.
//!
//! Every wait is bounded; every test removes what it built. Needs root and a built agent.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use k8s_openapi::api::events::v1::Event as K8sEvent;
use svc_tests::{
    apiserver::{ApiServer, Kind, Options},
    k8s::{self, Agent, EndpointSlice, Programmed, Protocol, Service, frontend_key},
    netns::{self, SERVICE_V4, Topology},
};
use tokio::runtime::Runtime;

const IO_TIMEOUT: Duration = Duration::from_secs(2);
const SYNC_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an agent may take to notice that the API server is back: its watchers retry with
/// client-go's backoff (0.8 s doubling to 30 s, jittered).
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(40);
const BACKEND_PORT: u16 = 8080;
const SERVICE_PORT: u16 = 80;

/// One test's cluster: a topology, the API server in node1's namespace, an agent on node1.
/// Fields drop in order: servers and agent first, the topology last.
struct Cluster {
    backends: k8s::Backends,
    agent: Option<Agent>,
    api: ApiServer,
    rt: Runtime,
    topo: Topology,
    kubeconfig: PathBuf,
    agent_bin: PathBuf,
    started: Instant,
}

impl Cluster {
    fn new(pods: &[(usize, &str)]) -> Self {
        if let Err(e) = netns::require_root() {
            panic!("{e:#}");
        }
        let agent_bin = k8s::agent_binary().unwrap_or_else(|e| panic!("{e:#}"));
        let started = Instant::now();
        let mut topo = Topology::new().expect("building the topology");
        for (node, name) in pods {
            topo.add_pod(*node, name)
                .unwrap_or_else(|e| panic!("adding pod {name}: {e:#}"));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a Tokio runtime");
        let node1 = topo.node(0);
        let options = Options {
            bookmark_interval: Some(Duration::from_millis(500)),
            ..Options::default()
        };
        let api = rt
            .block_on(ApiServer::start_in(
                &node1.ns,
                SocketAddr::new(node1.underlay_v4.into(), 0),
                options,
            ))
            .expect("starting the API server in node1's namespace");
        let kubeconfig = topo.run_dir().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig)
            .expect("writing the kubeconfig");
        for node in topo.nodes() {
            api.apply_yaml(&k8s::node_yaml(node))
                .expect("storing the Node");
        }
        let c = Self {
            backends: k8s::Backends::new(),
            agent: None,
            api,
            rt,
            topo,
            kubeconfig,
            agent_bin,
            started,
        };
        c.step(&format!(
            "topology {} up; API server on {} (node1's namespace)",
            c.topo.prefix(),
            c.api.url()
        ));
        c
    }

    fn step(&self, what: &str) {
        println!("[{:>6.2}s] {what}", self.started.elapsed().as_secs_f64());
    }

    fn pod(&self, name: &str) -> &netns::Pod {
        self.topo
            .pods()
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    fn serve(&self, pod: &str) {
        let p = self.pod(pod);
        self.backends
            .serve(&p.ns, pod, SocketAddr::new(p.ipv4.into(), BACKEND_PORT))
            .unwrap_or_else(|e| panic!("serving on {pod}: {e:#}"));
    }

    fn start_agent(&mut self) {
        let agent = Agent::start_kube(&self.agent_bin, self.topo.node(0), &self.kubeconfig)
            .unwrap_or_else(|e| panic!("starting svc-agent on node1: {e:#}"));
        self.agent = Some(agent);
        self.step("svc-agent running on node1, following the API server");
    }

    fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("the agent runs")
    }

    /// Stores `service` with one slice holding the ready `pods`.
    fn apply_service(&self, service: &Service, pods: &[&str]) {
        let pods: Vec<&netns::Pod> = pods.iter().map(|p| self.pod(p)).collect();
        let slice = EndpointSlice::new(&service.name, false)
            .ports_of(service, &[])
            .ready_pods(&self.topo, pods);
        let yaml = k8s::documents(&[service.to_yaml(), slice.to_yaml()]);
        self.api
            .apply_yaml(&yaml)
            .unwrap_or_else(|e| panic!("storing {}: {e:#}", service.name));
    }

    fn programmed(&self) -> Programmed {
        self.agent()
            .services()
            .unwrap_or_else(|e| panic!("inspect services: {e:#}"))
    }

    /// Waits (bounded by [`SYNC_TIMEOUT`]) until node1's maps satisfy `done`.
    fn wait_programmed(&self, what: &str, done: impl Fn(&Programmed) -> bool) {
        self.wait_programmed_within(what, SYNC_TIMEOUT, done);
    }

    /// Waits (at most `timeout`) until node1's maps satisfy `done`.
    fn wait_programmed_within(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&Programmed) -> bool,
    ) {
        let t = Instant::now();
        loop {
            let programmed = self.programmed();
            if done(&programmed) {
                break;
            }
            assert!(
                t.elapsed() < timeout,
                "{what}: not programmed within {timeout:?}:\n{}agent log:\n{}",
                programmed.text,
                self.agent().log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.step(&format!(
            "{what}: programmed after {:.0} ms",
            t.elapsed().as_secs_f64() * 1e3
        ));
    }

    /// Asserts that node1's `inspect services` names each of `pods` behind its backend: the
    /// slices' `targetRef` reach `BACKEND_NAMES_V1`.
    fn expect_names(&self, pods: &[&str]) {
        let programmed = self.programmed();
        let text = &programmed.text;
        for pod in pods {
            let ip = self
                .topo
                .pods()
                .iter()
                .find(|p| p.name == *pod)
                .unwrap()
                .ipv4;
            let addr = SocketAddr::new(ip.into(), BACKEND_PORT);
            assert_eq!(
                programmed.pod_of(&addr.to_string()),
                Some(format!("default/{pod}").as_str()),
                "inspect services does not name {pod} behind {addr}:\n{text}"
            );
        }
    }

    /// The backends node1 programmed for `vip:80/TCP`, as pod names.
    fn backend_pods(&self, programmed: &Programmed, vip: IpAddr) -> Option<Vec<String>> {
        let key = frontend_key(SocketAddr::new(vip, SERVICE_PORT), Protocol::Tcp);
        let addrs = programmed.backends(&key)?;
        let mut pods: Vec<String> = self
            .topo
            .pods()
            .iter()
            .filter(|p| addrs.contains(&SocketAddr::new(p.ipv4.into(), BACKEND_PORT).to_string()))
            .map(|p| p.name.clone())
            .collect();
        pods.sort();
        Some(pods)
    }

    fn has_backends(&self, vip: IpAddr, want: &[&str]) -> impl Fn(&Programmed) -> bool + '_ {
        let want: Vec<String> = want.iter().map(|s| (*s).to_owned()).collect();
        move |p| self.backend_pods(p, vip).as_ref() == Some(&want)
    }

    fn absent(&self, vip: IpAddr) -> impl Fn(&Programmed) -> bool + '_ {
        move |p| self.backend_pods(p, vip).is_none()
    }

    /// `n` TCP requests from the client pod to `vip:80`; returns the answering pods.
    fn requests(&self, vip: IpAddr, n: usize) -> Vec<String> {
        let dst = SocketAddr::new(vip, SERVICE_PORT);
        self.pod("client")
            .ns
            .run(move || {
                (0..n)
                    .map(|i| Ok(k8s::tcp_request(dst, &format!("r{i}"), IO_TIMEOUT)?.label))
                    .collect()
            })
            .unwrap_or_else(|e| panic!("requests to {dst}: {e:#}\n{}", self.agent().log()))
    }

    /// The "synced from the API server" log lines since line `from`.
    fn sync_lines(&self, from: usize) -> Vec<String> {
        self.agent()
            .log()
            .lines()
            .filter(|l| l.contains("synced from the API server"))
            .skip(from)
            .map(str::to_owned)
            .collect()
    }
}

fn vip(host: u32) -> IpAddr {
    SERVICE_V4.host(host).into()
}

fn web(host: u32, name: &str) -> Service {
    Service::cluster_ip(name, &[vip(host)]).port("http", Protocol::Tcp, SERVICE_PORT, BACKEND_PORT)
}

/// A field of a `key=value` log line (`services_written=0`).
fn field(line: &str, name: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
}

/// The kinds a sync line says were relisted (`relisted="Service,Node"` -> `["Service", "Node"]`).
fn relisted(line: &str) -> Vec<&str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("relisted="))
        .map(|v| {
            v.trim_matches('"')
                .split(',')
                .filter(|k| !k.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn maps_follow_the_api_server_through_drops_relists_and_outages() {
    let mut c = Cluster::new(&[(0, "client"), (0, "b1"), (1, "b2"), (1, "b3")]);
    for pod in ["b1", "b2", "b3"] {
        c.serve(pod);
    }
    let (web_vip, db_vip) = (vip(10), vip(11));
    c.apply_service(&web(10, "web"), &["b1", "b2"]);
    c.start_agent();
    c.wait_programmed("first sync", c.has_backends(web_vip, &["b1", "b2"]));
    c.expect_names(&["b1", "b2"]);
    let answered = c.requests(web_vip, 20);
    assert!(
        answered.iter().all(|l| l == "b1" || l == "b2"),
        "{answered:?}"
    );

    // Updates and adds.
    c.apply_service(&web(10, "web"), &["b1", "b2", "b3"]);
    c.wait_programmed(
        "b3 added to web's slice",
        c.has_backends(web_vip, &["b1", "b2", "b3"]),
    );
    c.apply_service(&web(11, "db"), &["b3"]);
    c.wait_programmed("Service db added", c.has_backends(db_vip, &["b3"]));

    // The watch breaks mid-stream; a change made meanwhile still arrives.
    c.api.drop_watches();
    c.apply_service(&web(10, "web"), &["b2", "b3"]);
    c.wait_programmed(
        "after a dropped watch: b1 removed",
        c.has_backends(web_vip, &["b2", "b3"]),
    );

    // 410: the history is compacted and the watches dropped, so every watcher relists. Nothing
    // changed, so every pass after a relist must write and delete nothing. The three watchers
    // relist independently (a pass may carry only the Node's relist): wait for the Service's.
    let before = c.sync_lines(0).len();
    c.api.compact_past_everyone();
    c.api.drop_watches();
    let t = Instant::now();
    let relist_lines = loop {
        let lines: Vec<String> = c
            .sync_lines(before)
            .into_iter()
            .filter(|l| l.contains("relisted=") && !l.contains("relisted=\"\""))
            .collect();
        if lines.iter().any(|l| relisted(l).contains(&"Service")) {
            break lines;
        }
        assert!(
            t.elapsed() < SYNC_TIMEOUT,
            "no relist of the Services within {SYNC_TIMEOUT:?}:\n{}",
            c.agent().log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    for relist_line in &relist_lines {
        c.step(&format!("relist after 410: {relist_line}"));
        for f in [
            "services_written",
            "services_deleted",
            "backends_written",
            "backends_deleted",
        ] {
            assert_eq!(
                field(relist_line, f),
                Some(0),
                "{f} after a relist of unchanged state: {relist_line}"
            );
        }
    }
    let relists = c
        .api
        .requests()
        .iter()
        .filter(|r| !r.watch && r.status == 200 && r.path.ends_with("services"))
        .count();
    assert!(relists >= 2, "the Service watcher did not relist");

    // The API server goes away; db is deleted meanwhile and the history compacted, so the
    // agent only learns of it by relisting when the server is back.
    c.rt.block_on(c.api.pause());
    c.api.delete(Kind::Service, k8s::NAMESPACE, "db");
    c.api.delete(Kind::EndpointSlice, k8s::NAMESPACE, "db");
    c.api.compact();
    c.step("API server away; Service db deleted meanwhile");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        c.backend_pods(&c.programmed(), db_vip).is_some(),
        "db vanished while the API server was away"
    );
    let answered = c.requests(web_vip, 10);
    assert_eq!(
        answered.len(),
        10,
        "web served while the API server was away"
    );
    c.rt.block_on(c.api.resume())
        .expect("resuming the API server");
    c.wait_programmed_within(
        "API server back: db removed",
        RECONNECT_TIMEOUT,
        c.absent(db_vip),
    );
    assert_eq!(
        c.backend_pods(&c.programmed(), web_vip),
        Some(vec!["b2".to_owned(), "b3".to_owned()])
    );

    // Deletes.
    c.api.delete(Kind::Service, k8s::NAMESPACE, "web");
    c.wait_programmed("Service web deleted", c.absent(web_vip));
}

#[test]
fn bad_objects_become_events_and_everything_else_is_programmed() {
    let mut c = Cluster::new(&[(0, "client"), (1, "b1")]);
    c.serve("b1");
    let good = vip(20);
    c.apply_service(&web(20, "good"), &["b1"]);
    // Port out of range, an unknown protocol, an address that does not parse.
    let bad_port = web(21, "bad-port")
        .to_yaml()
        .replace("port: 80", "port: 70000");
    let bad_proto = web(22, "bad-proto")
        .to_yaml()
        .replace("protocol: TCP", "protocol: ICMP");
    let bad_ip = web(23, "bad-ip")
        .to_yaml()
        .replace("198.19.0.23", "198.19.0.300");
    for yaml in [&bad_port, &bad_proto, &bad_ip] {
        c.api.apply_yaml(yaml).expect("storing a bad Service");
    }
    c.start_agent();
    c.wait_programmed(
        "good Service programmed next to bad ones",
        c.has_backends(good, &["b1"]),
    );
    assert_eq!(c.requests(good, 5).len(), 5);
    let t = Instant::now();
    let events = loop {
        let events: Vec<K8sEvent> = c.api.objects_of().expect("reading Events");
        if events.len() >= 3 {
            break events;
        }
        assert!(
            t.elapsed() < SYNC_TIMEOUT,
            "{} Events within {SYNC_TIMEOUT:?}: {events:#?}\n{}",
            events.len(),
            c.agent().log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    for (name, field) in [
        ("bad-port", "spec.ports[0].port"),
        ("bad-proto", "spec.ports[0].protocol"),
        ("bad-ip", "spec.clusterIP"),
    ] {
        let event = events
            .iter()
            .find(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .unwrap_or_else(|| panic!("no Event about {name}: {events:#?}"));
        let note = event.note.as_deref().unwrap_or_default();
        assert!(
            note.contains(field),
            "the Event about {name} does not name {field}: {note}"
        );
        assert_eq!(event.type_.as_deref(), Some("Warning"));
        assert_eq!(event.reason.as_deref(), Some("InvalidObject"));
        assert_eq!(event.reporting_controller.as_deref(), Some("svc-agent"));
        let regarding = event.regarding.as_ref().expect("regarding");
        assert!(regarding.uid.is_some(), "the Event names the object's uid");
        c.step(&format!("Event on {name}: {note}"));
    }
    let log = c.agent().log();
    assert!(
        log.contains("bad-port") && log.contains("70000"),
        "the log names the bad value:\n{log}"
    );
    // Reported once, not on every pass: another change makes another pass.
    c.apply_service(&web(24, "other"), &["b1"]);
    c.wait_programmed("another Service", c.has_backends(vip(24), &["b1"]));
    let again: Vec<K8sEvent> = c.api.objects_of().expect("reading Events");
    assert_eq!(
        again.len(),
        events.len(),
        "Events were published again for the same problems"
    );
}

#[test]
fn requests_keep_being_answered_while_the_api_server_is_away() {
    let mut c = Cluster::new(&[(0, "client"), (0, "b1"), (1, "b2")]);
    for pod in ["b1", "b2"] {
        c.serve(pod);
    }
    let v = vip(30);
    c.apply_service(&web(30, "web"), &["b1", "b2"]);
    c.start_agent();
    c.wait_programmed("first sync", c.has_backends(v, &["b1", "b2"]));

    let dst = SocketAddr::new(v, SERVICE_PORT);
    let client = c.pod("client").ns.clone();
    let load = std::thread::spawn(move || {
        client.run(move || {
            let (mut ok, mut failed) = (0_u32, Vec::new());
            let t = Instant::now();
            // About 8 s of requests, every 20 ms; bounded by count and time.
            for i in 0..400 {
                if t.elapsed() > Duration::from_secs(20) {
                    break;
                }
                match k8s::tcp_request(dst, &format!("r{i}"), IO_TIMEOUT) {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(format!("r{i}: {e:#}")),
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok((ok, failed))
        })
    });
    std::thread::sleep(Duration::from_secs(1));
    c.rt.block_on(c.api.pause());
    c.step("API server away for 4 s, under load");
    std::thread::sleep(Duration::from_secs(4));
    c.rt.block_on(c.api.resume())
        .expect("resuming the API server");
    c.step("API server back");
    // The agent is connected again: a change is applied.
    c.apply_service(&web(30, "web"), &["b2"]);
    c.wait_programmed_within(
        "change after the outage",
        RECONNECT_TIMEOUT,
        c.has_backends(v, &["b2"]),
    );
    let (ok, failed) = load.join().expect("load thread").expect("load");
    c.step(&format!(
        "requests during the outage: {ok} answered, {} failed",
        failed.len()
    ));
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(ok >= 200, "only {ok} requests ran");
    let warnings = c.agent().log().matches("watch failed").count();
    assert!(
        warnings > 0,
        "the agent did not notice the outage:\n{}",
        c.agent().log()
    );
}
