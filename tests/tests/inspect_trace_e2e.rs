//! `svc-agent inspect trace` against a running dataplane, and against real traffic, in both
//! configurations the suite runs (`SVC_TEST_SOCKET_LB`):
//!
//! - node1's agent (standalone) programs `web` (TCP `http` and UDP `dns` on port 80, `NodePort`
//!   30180 for both; endpoints web-0 on node1 and web-1 on node2 ready, old-0 on node1
//!   terminating), `local` (`internalTrafficPolicy: Local`, its only endpoint web-1 on node2)
//!   and `empty` (no endpoints);
//! - the verdicts trace gives for new flows from a pod: `web` one of web-0 and web-1 (not the
//!   terminating old-0), `local` dropped (`no_local_endpoint`), `empty` rejected, an unlisted
//!   port of the `ClusterIP` rejected, an address that is no frontend passed;
//! - trace agrees with real traffic: for 16 new UDP flows from outside (known source ports) the
//!   endpoint trace predicts (Maglev) is the one that answers, seeing the client address trace
//!   predicts (the client's own, or node1's SNAT address); after each, trace finds the flow in
//!   the connection tables going to that endpoint; an external TCP connection's entry is an
//!   established hit going to the endpoint that answered it; a pod's TCP connection is one
//!   too per packet (`host-only`), and no entry at all at the socket (`all`);
//! - the agent stopped: trace reads the pins the same way;
//! - bad arguments (two families, a name) fail with a message naming the problem.
//!
//! Needs root and the agent binary (`cargo build -p svc-agent`): fails, never skips, without
//! them.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    process::Command,
    time::Duration,
};

use svc_agent::inspect::trace::Trace;
use svc_tests::{
    k8s::{self, Agent, Backends, Endpoint, EndpointSlice, Protocol, Service, TcpSession},
    testbed::{TestBed, vip4},
};

const SERVICE_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
const NODE_PORT: u16 = 30180;
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// New external UDP flows compared with their traces: both endpoints are reached unless the
/// choice ignores the tuple (a miss has probability 2^-15).
const FLOWS: u16 = 16;
/// Their source ports (outside the ephemeral range, so each is a new flow).
const FIRST_PORT: u16 = 41_000;

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
    fn start() -> Self {
        let mut bed = TestBed::new(&[(0, "client"), (0, "web-0"), (1, "web-1"), (0, "old-0")]);
        let backends = Backends::new();
        bed.serve_pods(&backends, &["web-0", "web-1", "old-0"], BACKEND_PORT);
        let web = Service::cluster_ip("web", &[vip4(170)])
            .port("http", Protocol::Tcp, SERVICE_PORT, BACKEND_PORT)
            .node_port(NODE_PORT)
            .port("dns", Protocol::Udp, SERVICE_PORT, BACKEND_PORT)
            .node_port(NODE_PORT);
        let local = Service::cluster_ip("local", &[vip4(171)])
            .port("http", Protocol::Tcp, SERVICE_PORT, BACKEND_PORT)
            .internal_traffic_policy_local();
        let empty = Service::cluster_ip("empty", &[vip4(172)]).port(
            "http",
            Protocol::Tcp,
            SERVICE_PORT,
            BACKEND_PORT,
        );
        let topo = &bed.topo;
        let docs = [
            web.to_yaml(),
            EndpointSlice::new("web", false)
                .ports_of(&web, &[])
                .endpoint(Endpoint::ready(topo, bed.pod("web-0"), false))
                .endpoint(Endpoint::ready(topo, bed.pod("web-1"), false))
                .endpoint(Endpoint::terminating(topo, bed.pod("old-0"), false))
                .to_yaml(),
            local.to_yaml(),
            EndpointSlice::new("local", false)
                .ports_of(&local, &[])
                .endpoint(Endpoint::ready(topo, bed.pod("web-1"), false))
                .to_yaml(),
            empty.to_yaml(),
        ];
        bed.manifests
            .write("svc.yaml", &k8s::documents(&docs))
            .unwrap_or_else(|e| panic!("writing svc.yaml: {e:#}"));
        let agent = Agent::start(&bed.agent_bin, bed.topo.node(0), bed.manifests.path())
            .unwrap_or_else(|e| panic!("starting svc-agent on node1: {e:#}"));
        bed.agents.push(agent);
        Self { backends, bed }
    }

    fn bpffs(&self) -> std::path::PathBuf {
        self.topo.node(0).bpffs.clone()
    }

    /// `inspect trace <args> -o json`, parsed.
    fn trace(&self, args: &[&str]) -> Trace {
        let mut all = vec!["inspect", "trace", "-o", "json"];
        all.extend(args);
        let text = k8s::agent_command(&self.agent_bin, &self.bpffs(), &all)
            .unwrap_or_else(|e| panic!("{}: {e:#}", all.join(" ")));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("trace JSON: {e}\n{text}"))
    }

    fn endpoint(&self, pod: &str) -> String {
        SocketAddr::new(self.pod(pod).ipv4.into(), BACKEND_PORT).to_string()
    }

    fn node1(&self) -> IpAddr {
        self.topo.node(0).underlay_v4.into()
    }

    fn external(&self) -> IpAddr {
        self.topo.external().ipv4.into()
    }
}

/// Each backend's endpoint.
fn endpoints(t: &Trace) -> BTreeSet<String> {
    t.candidates.iter().map(|c| c.endpoint.clone()).collect()
}

fn verdict(t: &Trace) -> (&str, Option<&str>) {
    (t.verdict.as_str(), t.drop_reason.as_deref())
}

/// The verdicts of new flows from the client pod.
fn check_pod_verdicts(c: &Cluster) {
    let client = c.pod("client").ipv4.to_string();
    let web = format!("{}:{SERVICE_PORT}", vip4(170));
    let t = c.trace(&["--from", &client, "--to", &web, "--proto", "tcp"]);
    assert_eq!(verdict(&t), ("translated", None), "{t:#?}");
    assert_eq!(t.flow.as_deref(), Some("new"));
    assert_eq!(
        endpoints(&t),
        BTreeSet::from([c.endpoint("web-0"), c.endpoint("web-1")]),
        "one of the ready endpoints, not the terminating old-0: {t:#?}"
    );
    let f = t.frontend.as_ref().expect("a frontend");
    assert_eq!(
        (
            f.service.as_deref(),
            f.port_name.as_deref(),
            f.kind.as_str()
        ),
        (Some("default/web"), Some("http"), "ClusterIP")
    );
    let pods: BTreeSet<&str> = t.slots.iter().filter_map(|s| s.pod.as_deref()).collect();
    assert_eq!(pods, BTreeSet::from(["default/web-0", "default/web-1"]));
    let local = format!("{}:{SERVICE_PORT}", vip4(171));
    let t = c.trace(&["--from", &client, "--to", &local, "--proto", "tcp"]);
    assert_eq!(
        verdict(&t),
        ("dropped", Some("no_local_endpoint")),
        "{t:#?}"
    );
    let empty = format!("{}:{SERVICE_PORT}", vip4(172));
    let t = c.trace(&["--from", &client, "--to", &empty, "--proto", "tcp"]);
    assert_eq!(verdict(&t), ("rejected", Some("no_endpoints")), "{t:#?}");
    let unlisted = format!("{}:81", vip4(170));
    let t = c.trace(&["--from", &client, "--to", &unlisted, "--proto", "udp"]);
    assert_eq!(verdict(&t), ("rejected", Some("unlisted_port")), "{t:#?}");
    let nowhere = format!("{}:80", vip4(179));
    let t = c.trace(&["--from", &client, "--to", &nowhere, "--proto", "tcp"]);
    assert_eq!(verdict(&t), ("passed", None), "{t:#?}");
    // The table form numbers the steps and ends with the verdict.
    let text = k8s::agent_command(
        &c.agent_bin,
        &c.bpffs(),
        &[
            "inspect", "trace", "--from", &client, "--to", &local, "--proto", "tcp",
        ],
    )
    .expect("trace -o table");
    assert!(
        text.lines().nth(1).is_some_and(|l| l.starts_with("STEP")),
        "{text}"
    );
    assert!(
        text.trim_end()
            .ends_with("verdict: dropped (no_local_endpoint)"),
        "{text}"
    );
    c.step("trace from a pod: web one of web-0/web-1, local dropped, empty and :81 rejected");
}

/// New UDP flows from outside: trace's prediction, then the real datagram, then trace again.
fn check_external_udp(c: &Cluster) {
    let dst = SocketAddr::new(c.node1(), NODE_PORT);
    let mut answered = BTreeSet::new();
    for port in FIRST_PORT..FIRST_PORT + FLOWS {
        let from = SocketAddr::new(c.external(), port).to_string();
        let args = [
            "--from",
            &from,
            "--to",
            &dst.to_string(),
            "--proto",
            "udp",
            "--from-outside",
        ]
        .map(str::to_owned);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let before = c.trace(&args);
        assert_eq!(verdict(&before), ("translated", None), "{before:#?}");
        assert_eq!(before.flow.as_deref(), Some("new"), "{before:#?}");
        let predicted = before.backend.clone().expect("Maglev names one backend");
        assert!(
            before.steps.iter().any(|s| s.check == "maglev"),
            "{before:#?}"
        );
        let (answer, _) = c
            .topo
            .external()
            .ns
            .run(|| k8s::udp_request_from(port, dst, "trace", IO_TIMEOUT, 3))
            .unwrap_or_else(|e| panic!("UDP from {from} to {dst}: {e:#}{}", c.diag()));
        assert_eq!(
            predicted.pod.as_deref(),
            Some(format!("default/{}", answer.label).as_str()),
            "trace predicted {predicted:?} for {from}, {} answered{}",
            answer.label,
            c.diag()
        );
        let want_seen = if predicted.local {
            assert_eq!(before.snat, None);
            c.external()
        } else {
            let snat = before.snat.as_ref().expect("a remote endpoint gets SNAT");
            assert_eq!(snat.address, c.node1());
            c.node1()
        };
        assert_eq!(answer.client_seen, want_seen, "{before:#?}");
        let after = c.trace(&args);
        assert_eq!(after.flow.as_deref(), Some("established"), "{after:#?}");
        assert_eq!(after.backend.as_ref().map(|b| b.id), Some(predicted.id));
        if let (Some(snat), Some(rw)) = (&before.snat, &after.rewritten) {
            assert_eq!(
                rw.source,
                format!("{}:{}", snat.address, snat.port.expect("a known port")),
                "the port trace predicted is the port the flow took"
            );
        }
        answered.insert(answer.label);
    }
    assert_eq!(answered.len(), 2, "{FLOWS} flows reached {answered:?} only");
    c.step(&format!(
        "{FLOWS} UDP flows from outside: each answered by the endpoint trace predicted (Maglev), \
         with the SNAT it predicted; each then an established entry"
    ));
}

/// An open TCP connection's entry is an established hit going where the server answered.
fn check_tcp_session(
    c: &Cluster,
    session: &mut TcpSession,
    from: &str,
    dst: SocketAddr,
    outside: bool,
) -> Trace {
    let answer = session.ask("who").expect("a request on the connection");
    let local = session.local_addr().expect("local address");
    let src = SocketAddr::new(from.parse().unwrap(), local.port()).to_string();
    let dst = dst.to_string();
    let mut args = vec![
        "--from",
        &src,
        "--to",
        &dst,
        "--proto",
        "tcp",
        "--tcp-flags",
        "ack",
    ];
    if outside {
        args.push("--from-outside");
    }
    let t = c.trace(&args);
    if !outside && k8s::pods_at_socket() {
        // Translated at connect(): no entry, and the trace says so.
        assert_eq!(t.flow.as_deref(), Some("new"), "{t:#?}");
        let misses = t
            .steps
            .iter()
            .filter(|s| s.check == "conntrack" && s.result == "miss")
            .count();
        assert_eq!(misses, 2, "{t:#?}");
        return t;
    }
    assert_eq!(t.flow.as_deref(), Some("established"), "{t:#?}");
    assert!(
        t.steps
            .iter()
            .any(|s| s.check == "conntrack" && s.result == "hit" && s.detail.starts_with("CT_V1")),
        "{t:#?}"
    );
    let backend = t.backend.as_ref().expect("the flow's backend");
    assert_eq!(
        backend.pod.as_deref(),
        Some(format!("default/{}", answer.label).as_str()),
        "{t:#?}"
    );
    assert_eq!(
        t.rewritten.as_ref().map(|r| r.destination.as_str()),
        Some(c.endpoint(&answer.label).as_str())
    );
    t
}

/// TCP connections from outside until one lands on each endpoint (web-0 local, web-1 through
/// SNAT), by the endpoint that answered.
fn external_sessions(c: &Cluster, dst: SocketAddr) -> BTreeMap<String, TcpSession> {
    let mut sessions = BTreeMap::new();
    for i in 0..48 {
        let mut s = c
            .topo
            .external()
            .ns
            .run(|| TcpSession::connect(dst, IO_TIMEOUT))
            .expect("TCP from outside");
        let answer = s.ask(&format!("open-{i}")).expect("a first request");
        sessions.entry(answer.label).or_insert(s);
        if sessions.len() == 2 {
            return sessions;
        }
    }
    panic!(
        "48 connections from outside did not reach both endpoints{}",
        c.diag()
    );
}

#[test]
fn trace_walks_the_kernels_decision_and_agrees_with_real_traffic() {
    let mut c = Cluster::start();
    check_pod_verdicts(&c);
    check_external_udp(&c);

    let dst = SocketAddr::new(c.node1(), NODE_PORT);
    let external = c.external().to_string();
    let mut outside = external_sessions(&c, dst);
    for (label, session) in &mut outside {
        let t = check_tcp_session(&c, session, &external, dst, true);
        let rewritten = t.rewritten.as_ref().unwrap();
        if label == "web-1" {
            // SNAT'd: the source is node1's address and the port SNAT_V1 holds for the client.
            let port = t.snat.as_ref().and_then(|s| s.port).expect("an SNAT port");
            assert_eq!(rewritten.source, format!("{}:{port}", c.node1()));
            let nat =
                k8s::agent_command(&c.agent_bin, &c.bpffs(), &["inspect", "nat", "-o", "json"])
                    .expect("inspect nat");
            let rows: Vec<svc_agent::inspect::nat::NatRow> =
                serde_json::from_str(&nat).expect("nat JSON");
            let client = session.local_addr().unwrap().port();
            assert!(
                rows.iter().any(|r| r.snat_port == port
                    && r.client == format!("{external}:{client}")
                    && r.endpoint == c.endpoint("web-1")),
                "trace says SNAT port {port}, inspect nat:\n{nat}"
            );
        } else {
            assert_eq!(t.snat, None);
            assert!(rewritten.source.starts_with(&format!("{external}:")));
        }
    }
    c.step("external TCP connections: trace finds each established, to the endpoint that answered, with the SNAT port SNAT_V1 holds");
    let vip = SocketAddr::new(vip4(170), SERVICE_PORT);
    let client = c.pod("client").ipv4.to_string();
    let mut inside = c
        .pod("client")
        .ns
        .run(|| TcpSession::connect(vip, IO_TIMEOUT))
        .expect("TCP from the client pod");
    check_tcp_session(&c, &mut inside, &client, vip, false);
    c.step(&format!(
        "a pod's TCP connection: {}",
        if k8s::pods_at_socket() {
            "translated at connect(), no conntrack entry (trace: miss)"
        } else {
            "established per packet, to the endpoint that answered"
        }
    ));

    // Stopped: the pins answer the same.
    let agent = c.bed.agents.pop().unwrap();
    assert!(agent.stop().expect("stopping the agent").success());
    for session in outside.values_mut() {
        check_tcp_session(&c, session, &external, dst, true);
    }
    c.step("agent stopped: trace still finds the external connections established");
    drop((outside, inside));

    for (args, says) in [
        (
            [
                "--from",
                "2001:db8::1",
                "--to",
                "198.19.0.170:80",
                "--proto",
                "tcp",
            ],
            "different address families",
        ),
        (
            [
                "--from",
                "client",
                "--to",
                "198.19.0.170:80",
                "--proto",
                "tcp",
            ],
            "is not ADDR or ADDR:PORT",
        ),
    ] {
        let out = Command::new(&c.agent_bin)
            .arg("--bpffs")
            .arg(c.bpffs())
            .args(["inspect", "trace"])
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    c.step("bad arguments: said plainly, no trace");

    let Cluster { backends, bed } = c;
    drop(backends);
    bed.finish();
}
