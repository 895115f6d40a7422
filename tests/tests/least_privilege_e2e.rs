//! The agent as the `DaemonSet` runs it: uid 0 with only the capabilities of
//! `manifests/deploy/daemonset.yaml` (read from the file, so manifest and test cannot
//! diverge) and no way to gain others (`setpriv`: bounding set, no inheritable or ambient
//! capabilities, `no_new_privs` as `allowPrivilegeEscalation: false`). Two emulated nodes, an
//! agent on each started that way, a `ClusterIP` Service whose one backend is on node2 and a
//! client pod on node1: the agents program their maps (`inspect services`, also run with those
//! capabilities, shows them) and the client's connections reach the backend; node1's agent is then restarted and takes over its pinned links (which needs
//! `CAP_SYS_ADMIN`: the programs on a TCX hook are opened by id), and traffic still flows.
//! Last the backend is replaced by another: a connected UDP socket of the client pod that the
//! connect-time programs sent to the old one is destroyed by the restarted agent (`setns` into
//! the pod's namespace: `CAP_SYS_ADMIN`; `SOCK_DESTROY`: `CAP_NET_ADMIN`) and reaches the new
//! one once connected again (per packet, `--socket-lb host-only`: nothing to destroy, the next
//! datagram goes to the new backend).
//! With `CAP_SYS_ADMIN` removed from the set the agent refuses to start, naming it, before it
//! pins anything.
//!
//! Every test builds its own topology and removes it at the end; every wait is bounded. Needs
//! root, `setpriv` (util-linux) and a built agent (`cargo build -p svc-agent`): fails, never
//! skips, without them.

use std::{
    ffi::{OsStr, OsString},
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    path::Path,
    time::{Duration, Instant},
};

use k8s_openapi::api::apps::v1::DaemonSet;
use serde_json::Value;
use svc_agent::caps::{self, Cap};
use svc_tests::{
    k8s::{self, Agent, EndpointSlice, Protocol, Service, frontend_key},
    testbed::{TestBed, vip4, vip6},
};

const DAEMONSET: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../manifests/deploy/daemonset.yaml"
);
/// Bound on every connect, read and write.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Requests per address family after each start.
const REQUESTS: usize = 10;
const SERVICE_PORT: u16 = 80;
/// The Service's UDP port (to the same backend port: the test servers answer TCP and UDP).
const UDP_PORT: u16 = 53;
const BACKEND_PORT: u16 = 8080;
/// How long the agents may take to apply a change of the directory, and the restarted agent
/// to destroy the socket of the ended backend.
const SYNC_TIMEOUT: Duration = Duration::from_secs(5);

/// The capabilities the `DaemonSet` adds to the agent's container, which drops every other.
fn daemonset_capabilities() -> Vec<Cap> {
    let text = std::fs::read_to_string(DAEMONSET).expect("reading the DaemonSet");
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).expect("the DaemonSet is YAML");
    let doc = docs
        .into_iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    let ds: DaemonSet = serde_json::from_value(doc).expect("an apps/v1 DaemonSet");
    let pod = ds.spec.expect("spec").template.spec.expect("pod spec");
    let container = pod
        .containers
        .iter()
        .find(|c| c.name == "svc-agent")
        .expect("the svc-agent container");
    let capabilities = container
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .expect("the container's capabilities");
    assert_eq!(
        capabilities.drop.as_deref(),
        Some(&["ALL".to_owned()][..]),
        "the DaemonSet drops every capability it does not add"
    );
    capabilities
        .add
        .iter()
        .flatten()
        .map(|name| Cap::from_name(name).unwrap_or_else(|| panic!("{name}: no capability")))
        .collect()
}

fn mask(caps: &[Cap]) -> u64 {
    caps.iter().fold(0, |m, c| m | c.bit())
}

/// `setpriv` arguments that exec the agent as uid 0 with exactly `caps` (effective, permitted
/// and bounding), no inheritable or ambient ones, and `no_new_privs`.
fn launcher(caps: &[Cap]) -> Vec<OsString> {
    let bounding: Vec<String> = caps
        .iter()
        .map(|c| format!("+{}", c.name().to_ascii_lowercase()))
        .collect();
    [
        "setpriv".to_owned(),
        "--inh-caps=-all".to_owned(),
        "--ambient-caps=-all".to_owned(),
        format!("--bounding-set=-all,{}", bounding.join(",")),
        "--no-new-privs".to_owned(),
        "--".to_owned(),
    ]
    .map(OsString::from)
    .to_vec()
}

/// Asserts that process `pid` holds exactly `caps` and can never gain another.
fn assert_holds_exactly(pid: u32, caps: &[Cap], who: &str) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("{who}: /proc/{pid}/status: {e}"));
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("svc-agent"),
        "{who}: {pid} is not the agent (the launcher execs it)"
    );
    let field = |name: &str| {
        caps::status_mask(&status, name).unwrap_or_else(|| panic!("{who}: no {name}:\n{status}"))
    };
    let want = mask(caps);
    for (name, expected) in [
        ("CapEff", want),
        ("CapPrm", want),
        ("CapBnd", want),
        ("CapInh", 0),
        ("CapAmb", 0),
    ] {
        let got = field(name);
        assert_eq!(
            got,
            expected,
            "{who}: {name} holds {:?}, want {:?}",
            caps::in_mask(got),
            caps::in_mask(expected)
        );
    }
    let line = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(line("NoNewPrivs:"), "1", "{who}: no_new_privs");
    assert!(
        line("Uid:").starts_with("0\t"),
        "{who}: uid {}",
        line("Uid:")
    );
}

/// `REQUESTS` TCP requests from the client pod to each VIP: all answered by `web`, which saw
/// the client's own address.
fn requests_reach_the_backend(bed: &TestBed, vips: &[IpAddr], tag: &str) {
    let client = bed.pod("client");
    for &vip in vips {
        let dst = SocketAddr::new(vip, SERVICE_PORT);
        let client_ip = bed.pod_ip("client", vip);
        client
            .ns
            .run(|| {
                for i in 0..REQUESTS {
                    let request = format!("{tag}-{i}");
                    let answer = k8s::tcp_request(dst, &request, IO_TIMEOUT)?;
                    anyhow::ensure!(
                        answer.label == "web" && answer.from == dst,
                        "{request}: answered by {} from {}",
                        answer.label,
                        answer.from
                    );
                    anyhow::ensure!(
                        answer.client_seen == client_ip,
                        "{request}: web saw {}, not {client_ip}",
                        answer.client_seen
                    );
                }
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{e:#}{}", bed.diag()));
    }
    bed.step(&format!(
        "{tag}: {} TCP requests from client (node1) through {vips:?} answered by web (node2)",
        REQUESTS * vips.len()
    ));
}

#[test]
fn the_daemonsets_capabilities_run_the_agent_and_serve_a_cluster_ip() {
    let granted = daemonset_capabilities();
    caps::check(mask(&granted), true).expect("the DaemonSet grants what the agent checks for");
    let launcher = launcher(&granted);
    let launcher: Vec<&OsStr> = launcher.iter().map(OsString::as_os_str).collect();
    let mut bed = TestBed::new(&[(0, "client"), (1, "web"), (1, "web2")]);
    let (v4, v6) = (vip4(40), vip6(40));
    bed.manifests
        .write("web.yaml", &service_yaml(&bed, &[v4, v6], "web"))
        .expect("writing the Service");
    let backends = k8s::Backends::new();
    for name in ["web", "web2"] {
        let pod = bed.pod(name);
        for ip in [IpAddr::from(pod.ipv4), pod.ipv6.into()] {
            backends
                .serve(&pod.ns, name, SocketAddr::new(ip, BACKEND_PORT))
                .unwrap_or_else(|e| panic!("serving {name}: {e:#}"));
        }
    }
    bed.start_agents_under(&launcher);
    for (node, agent) in bed.agents.iter().enumerate() {
        assert_holds_exactly(agent.pid(), &granted, &format!("node{}'s agent", node + 1));
    }
    bed.step(&format!(
        "both agents hold exactly {:?} (effective, permitted, bounding), none inheritable or \
         ambient, no_new_privs",
        granted.iter().map(ToString::to_string).collect::<Vec<_>>()
    ));
    let want_backend =
        |vip: IpAddr| SocketAddr::new(bed.pod_ip("web", vip), BACKEND_PORT).to_string();
    for node in 0..2 {
        let programmed = bed.programmed(node);
        for (vip, port, proto) in [v4, v6].into_iter().flat_map(|v| {
            [
                (v, SERVICE_PORT, Protocol::Tcp),
                (v, UDP_PORT, Protocol::Udp),
            ]
        }) {
            let key = frontend_key(SocketAddr::new(vip, port), proto);
            assert_eq!(
                programmed.backends(&key),
                Some([want_backend(vip)].into()),
                "node{} {key}:\n{}",
                node + 1,
                programmed.text
            );
        }
    }
    bed.step("both agents programmed web's four frontends (2 VIPs x TCP/UDP) with web behind each");
    // What an operator runs in the agent's container (`kubectl exec ds/svc-agent -- svc-agent
    // inspect services`) works with its capabilities too.
    let out = std::process::Command::new(launcher[0])
        .args(&launcher[1..])
        .arg(&bed.agent_bin)
        .arg("--bpffs")
        .arg(bed.agent(0).bpffs())
        .args(["inspect", "services", "-o", "json"])
        .output()
        .expect("running inspect under setpriv");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(&format!("\"{v4}:{SERVICE_PORT}\"")),
        "inspect services with the DaemonSet's capabilities: {out:?}"
    );

    requests_reach_the_backend(&bed, &[v4, v6], "first");

    // A restart under the same capabilities takes over the pinned links (the programs on
    // each TCX hook are opened by id: CAP_SYS_ADMIN) without a warning.
    let old = bed.agents.remove(0);
    let (status, log) = old.stop_with_log().expect("stopping node1's agent");
    assert!(
        status.success(),
        "node1's agent ended with {status}:\n{log}"
    );
    let node1 = &bed.topo.nodes()[0];
    let again = Agent::start_under(&launcher, &bed.agent_bin, node1, bed.manifests.path())
        .unwrap_or_else(|e| panic!("restarting node1's agent: {e:#}"));
    assert_holds_exactly(again.pid(), &granted, "node1's restarted agent");
    let log = again.log();
    let took_over = log
        .matches("took over the pinned TC links of an earlier agent")
        .count();
    // The client pod's interface and the node's uplink.
    assert!(
        took_over >= 2,
        "node1's restarted agent took over {took_over} interfaces' links:\n{log}"
    );
    bed.agents.insert(0, again);
    bed.step(&format!(
        "node1's agent restarted under the same capabilities: took over the pinned TC links \
         of {took_over} interfaces (BPF_LINK_UPDATE)"
    ));
    requests_reach_the_backend(&bed, &[v4, v6], "after-restart");
    udp_socket_of_the_ended_backend_moves_on(&mut bed, v4, v6);
    drop(backends);
    bed.finish();
}

/// The Service `web` on `vips` (TCP 80 and UDP 53 to 8080) with `backend` its one endpoint.
fn service_yaml(bed: &TestBed, vips: &[IpAddr], backend: &str) -> String {
    let svc = Service::cluster_ip("web", vips)
        .port("http", Protocol::Tcp, SERVICE_PORT, BACKEND_PORT)
        .port("dns", Protocol::Udp, UDP_PORT, BACKEND_PORT);
    let mut docs = vec![svc.to_yaml()];
    for vip in vips {
        docs.push(
            EndpointSlice::new("web", vip.is_ipv6())
                .ports_of(&svc, &[])
                .ready_pods(&bed.topo, [bed.pod(backend)])
                .to_yaml(),
        );
    }
    k8s::documents(&docs)
}

/// The first word of the answer to `request` on the connected `socket` (the server's label).
fn ask(socket: &UdpSocket, request: &str) -> anyhow::Result<String> {
    socket.send(request.as_bytes())?;
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf)?;
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    Ok(text
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// A connected UDP socket of the client pod talks to `web`; `web` leaves the Service for
/// `web2`. At the socket (`--socket-lb all`) node1's agent, running with the `DaemonSet`'s
/// capabilities, destroys it in the pod's namespace (`ECONNABORTED`), and connected again it
/// reaches `web2`; per packet the next datagram on it reaches `web2`.
fn udp_socket_of_the_ended_backend_moves_on(bed: &mut TestBed, v4: IpAddr, v6: IpAddr) {
    let dst = SocketAddr::new(v4, UDP_PORT);
    let client = bed.pod("client").ns.clone();
    let socket = client
        .run(|| {
            let socket = k8s::udp_socket(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0))?;
            socket.connect(dst)?;
            socket.set_read_timeout(Some(IO_TIMEOUT))?;
            let label = ask(&socket, "hello")?;
            anyhow::ensure!(label == "web", "answered by {label}");
            Ok(socket)
        })
        .unwrap_or_else(|e| panic!("a connected UDP socket to {dst}: {e:#}{}", bed.diag()));
    let before: Vec<usize> = bed.agents.iter().map(Agent::syncs).collect();
    bed.manifests
        .write("web.yaml", &service_yaml(bed, &[v4, v6], "web2"))
        .expect("writing the Service");
    for (agent, before) in bed.agents.iter_mut().zip(before) {
        agent
            .wait_syncs(before + 1, SYNC_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e:#}"));
    }
    if k8s::pods_at_socket() {
        let deadline = Instant::now() + SYNC_TIMEOUT;
        let error = loop {
            if let Some(error) = socket.take_error().expect("SO_ERROR") {
                break error;
            }
            assert!(
                Instant::now() < deadline,
                "the socket connected to web was not destroyed within {SYNC_TIMEOUT:?}; \
                 node1's agent:\n{}",
                bed.agent(0).log()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(
            error.raw_os_error(),
            Some(nix::libc::ECONNABORTED),
            "{error}"
        );
        let log = bed.agent(0).log();
        assert!(
            log.contains(
                "destroyed 1 connected UDP sockets of ended backends in 1 network namespaces"
            ),
            "node1's agent did not log the destroy:\n{log}"
        );
        socket.connect(dst).expect("connecting the socket again");
    }
    let label = ask(&socket, "again").unwrap_or_else(|e| panic!("asking {dst} again: {e}"));
    assert_eq!(label, "web2", "after web left the Service");
    bed.step(&format!(
        "web replaced by web2: the client's connected UDP socket {}, then reached web2",
        if k8s::pods_at_socket() {
            "was destroyed by node1's agent (ECONNABORTED) in the pod's namespace"
        } else {
            "(translated per packet) was left alone"
        }
    ));
}

#[test]
fn without_cap_sys_admin_the_agent_refuses_to_start_and_names_it() {
    let mut granted = daemonset_capabilities();
    assert!(
        granted.contains(&Cap::SYS_ADMIN),
        "the DaemonSet grants CAP_SYS_ADMIN"
    );
    granted.retain(|c| *c != Cap::SYS_ADMIN);
    let launcher = launcher(&granted);
    let launcher: Vec<&OsStr> = launcher.iter().map(OsString::as_os_str).collect();
    let bed = TestBed::new(&[]);
    let node = &bed.topo.nodes()[0];
    let err = Agent::start_under(&launcher, &bed.agent_bin, node, bed.manifests.path())
        .map(|agent| {
            let log = agent.log();
            let _ = agent.stop();
            log
        })
        .expect_err("an agent without CAP_SYS_ADMIN started");
    let err = format!("{err:#}");
    assert!(err.contains("exited (exit status: 1)"), "{err}");
    assert!(
        err.contains(
            "svc-agent run lacks CAP_SYS_ADMIN (taking over pinned TCX links \
             (BPF_PROG_GET_FD_BY_ID) and entering pods' network namespaces (setns)"
        ),
        "{err}"
    );
    assert!(
        err.contains("its effective capabilities are CAP_NET_ADMIN, CAP_PERFMON, CAP_BPF"),
        "{err}"
    );
    // Refused before anything touched the bpffs (the pin directory's lock comes later).
    assert!(
        !Path::new(&node.bpffs).join("svc").exists(),
        "the refused agent created {}/svc",
        node.bpffs.display()
    );
    bed.step("without CAP_SYS_ADMIN: refused at start, naming it, nothing pinned");
    bed.finish();
}
