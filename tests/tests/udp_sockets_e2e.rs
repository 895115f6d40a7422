//! Connected UDP sockets of a removed backend are destroyed, end to end, through the real
//! agent: a `ClusterIP` UDP Service (one test per family) with two backend pods on node2, and
//! on node1 two clients whose sockets the connect-time programs translate (the agent attaches
//! them at node1's cgroup): a host process in node1's namespace, and a process in a pod's
//! namespace but in node1's cgroup (as every pod is under the cgroup root the shipped `DaemonSet`
//! attaches to).
//!
//! Each client connects a UDP socket to the service address until it lands on `be1`, then
//! exchanges datagrams on it; beside it, a control socket connected to `be1`'s pod address
//! directly (not through the service). Then `be1` leaves the `EndpointSlice` (its pod and
//! server stay, as while a pod terminates). What must hold:
//! - the translated socket fails with `ECONNABORTED` (the agent destroyed it), the client
//!   connects it again and reaches `be2` within [`RECONNECT_WITHIN`];
//! - the control socket is never touched: it goes on exchanging datagrams with `be1`;
//! - node1's agent logs that it destroyed both sockets, in two network namespaces.
//!
//! Without the agent's destroying, a connected socket keeps its backend forever (no error, no
//! reconnect): this test fails. Needs root, `python3` (the clients) and a built agent (`cargo
//! build -p svc-agent`): fails, never skips, without them. Every socket operation has a
//! timeout and every loop is bounded; the topology is removed at the end.

use std::{
    net::{IpAddr, SocketAddr},
    process::Command,
    time::{Duration, Instant},
};

use svc_tests::{
    k8s::{self, Agent, Backends, EndpointSlice, Protocol, Service},
    netns::Process,
    testbed::{TestBed, family, vip4, vip6},
};

/// The Service's port and the backends' port.
const SERVICE_PORT: u16 = 53;
const BACKEND_PORT: u16 = 5353;
/// The backend that is removed, and the one that stays.
const GOING: &str = "be1";
const STAYING: &str = "be2";
/// How long the agents may take to apply a change of the directory.
const SYNC_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client may take to land its socket on [`GOING`] and exchange datagrams.
const CLIENT_READY: Duration = Duration::from_secs(30);
/// From the agents' sync of the removal until each client talks to [`STAYING`] again.
const RECONNECT_WITHIN: Duration = Duration::from_secs(5);

/// The client: `vip port want control_ip`. Connects a UDP socket to `vip:port` (new socket per
/// try, at most 40 tries) until `want` answers, then every 100 ms sends one datagram on it and
/// one on a control socket connected to `control_ip:5353`, each answer awaited 0.5 s; between
/// exchanges it waits on the main socket (`select`), so an error wakes it. Prints a line
/// whenever a socket's state changes (`main ok be1`, `main error ECONNABORTED`, ...); on an
/// error the main socket is connected again to `vip:port`. A socket destroyed while the client
/// was about to send says `EDESTADDRREQ` (it was disconnected) with `ECONNABORTED` pending in
/// `SO_ERROR`: the client reports the pending error, as a careful application would. Stops
/// after 90 s at the latest.
const CLIENT_PY: &str = r#"
import errno, select, socket, sys, time

vip, port, want, control_ip = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
fam = socket.AF_INET6 if ":" in vip else socket.AF_INET

def err(e):
    if isinstance(e, socket.timeout):
        return "TIMEOUT"
    return errno.errorcode.get(e.errno, str(e.errno))

def ask(s, text):
    s.send(text)
    data = s.recv(512)
    words = data.decode(errors="replace").split()
    return words[0] if words else "-"

main = None
for attempt in range(40):
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.settimeout(0.5)
    s.connect((vip, port))
    label = None
    for _ in range(3):
        try:
            label = ask(s, b"hello")
            break
        except OSError:
            pass
    if label == want:
        main = s
        break
    s.close()
if main is None:
    print("main never reached", want, flush=True)
    sys.exit(1)
peer = main.getpeername()
print("first peer", peer[0], peer[1], flush=True)

control = socket.socket(fam, socket.SOCK_DGRAM)
control.settimeout(0.5)
control.connect((control_ip, 5353))

last = {}
def report(name, what):
    if last.get(name) != what:
        last[name] = what
        print(name, what, flush=True)

def failed(e):
    # A socket destroyed while the client was not waiting on it is disconnected: send() says
    # EDESTADDRREQ and the reason is still pending in SO_ERROR.
    if getattr(e, "errno", None) == errno.EDESTADDRREQ:
        pending = main.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if pending:
            e = OSError(pending, "pending")
    report("main", "error " + err(e))
    if isinstance(e, socket.timeout):
        return
    try:
        main.connect((vip, port))
        peer = main.getpeername()
        report("main", "reconnected %s %s" % (peer[0], peer[1]))
    except OSError as e2:
        report("main", "reconnect-error " + err(e2))

end = time.monotonic() + 90
n = 0
while time.monotonic() < end:
    n += 1
    try:
        report("main", "ok " + ask(main, b"ping %d" % n))
    except OSError as e:
        failed(e)
    try:
        report("control", "ok " + ask(control, b"control %d" % n))
    except OSError as e:
        report("control", "error " + err(e))
    # Between exchanges the client waits on its socket, as an event-driven client does: a
    # socket error wakes it (and its recv() says which).
    readable, _, _ = select.select([main], [], [], 0.1)
    if readable:
        try:
            main.recv(512)
        except OSError as e:
            failed(e)
print("DONE", flush=True)
"#;

/// One test's cluster. Fields drop in order: servers, then the bed (agents, then topology).
struct Cluster {
    servers: Backends,
    bed: TestBed,
}

impl std::ops::Deref for Cluster {
    type Target = TestBed;
    fn deref(&self) -> &TestBed {
        &self.bed
    }
}

impl Cluster {
    /// Node2 holds both backend pods (serving UDP on both families), node1 the client pod;
    /// the Service `dns` (`vip`, UDP) has both backends; the agents are running.
    fn new(vip: IpAddr) -> Self {
        let mut cluster = Self {
            servers: Backends::new(),
            bed: TestBed::new(&[(0, "client"), (1, GOING), (1, STAYING)]),
        };
        for pod in [GOING, STAYING] {
            let p = cluster.pod(pod);
            for ip in [IpAddr::from(p.ipv4), p.ipv6.into()] {
                cluster
                    .servers
                    .serve(&p.ns, pod, SocketAddr::new(ip, BACKEND_PORT))
                    .unwrap_or_else(|e| panic!("serving {pod} on {ip}: {e:#}"));
            }
        }
        let yaml = cluster.service_yaml(vip, &[GOING, STAYING]);
        cluster
            .bed
            .manifests
            .write("dns.yaml", &yaml)
            .expect("writing the Service");
        cluster.bed.start_agents();
        cluster
    }

    /// The Service `dns` on `vip` with one `EndpointSlice` listing `pods` as ready.
    fn service_yaml(&self, vip: IpAddr, pods: &[&str]) -> String {
        let svc = Service::cluster_ip("dns", &[vip]).port(
            "dns",
            Protocol::Udp,
            SERVICE_PORT,
            BACKEND_PORT,
        );
        let slice = EndpointSlice::new("dns", vip.is_ipv6())
            .ports_of(&svc, &[])
            .ready_pods(&self.bed.topo, pods.iter().map(|p| self.pod(p)));
        k8s::documents(&[svc.to_yaml(), slice.to_yaml()])
    }

    /// Starts the client in node1's cgroup: in node1's namespace (`in_pod` false) or in the
    /// client pod's.
    fn client(&self, vip: IpAddr, in_pod: bool) -> Process {
        let node = self.topo.node(0);
        let ns = if in_pod {
            &self.pod("client").ns
        } else {
            &node.ns
        };
        let mut cmd = Command::new("python3");
        cmd.args(["-c", CLIENT_PY])
            .arg(vip.to_string())
            .arg(SERVICE_PORT.to_string())
            .arg(GOING)
            .arg(self.pod_ip(GOING, vip).to_string());
        ns.spawn(&cmd, Some(&node.cgroup))
            .unwrap_or_else(|e| panic!("starting the client in {ns}: {e:#}"))
    }

    /// Writes the Service with `pods` only and waits until both agents synced it; returns when
    /// it was written.
    fn set_endpoints(&mut self, vip: IpAddr, pods: &[&str]) -> Instant {
        let yaml = self.service_yaml(vip, pods);
        let before: Vec<usize> = self.bed.agents.iter().map(Agent::syncs).collect();
        let written = Instant::now();
        self.bed
            .manifests
            .write("dns.yaml", &yaml)
            .expect("writing the Service");
        for (agent, before) in self.bed.agents.iter_mut().zip(before) {
            agent
                .wait_syncs(before + 1, SYNC_TIMEOUT)
                .unwrap_or_else(|e| panic!("{e:#}"));
        }
        written
    }
}

/// The state lines (`<socket> <state...>`) a client printed for `socket`, in order.
fn states(output: &str, socket: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|l| l.strip_prefix(socket)?.strip_prefix(' '))
        .map(str::to_owned)
        .collect()
}

/// Every "destroyed N connected UDP sockets ... in M network namespaces" `(N, M)` in `log`.
fn destroy_lines(log: &str) -> Vec<(u64, u64)> {
    log.lines()
        .filter_map(|l| {
            let rest = l.split_once("destroyed ")?.1;
            let (n, rest) = rest.split_once(" connected UDP sockets of ended backends in ")?;
            let (m, _) = rest.split_once(' ')?;
            Some((n.parse().ok()?, m.parse().ok()?))
        })
        .collect()
}

fn connected_udp_sockets_of_a_removed_backend_are_destroyed(vip: IpAddr) {
    python3();
    let mut cluster = Cluster::new(vip);
    let fam = family(vip);
    let mut clients = [
        ("host process", cluster.client(vip, false)),
        ("pod", cluster.client(vip, true)),
    ];
    let going = SocketAddr::new(vip, SERVICE_PORT);
    for (who, client) in &mut clients {
        client
            .wait_for_output(&format!("main ok {GOING}"), CLIENT_READY)
            .unwrap_or_else(|e| panic!("{fam} {who} client: {e:#}{}", cluster.diag()));
        client
            .wait_for_output(&format!("control ok {GOING}"), CLIENT_READY)
            .unwrap_or_else(|e| panic!("{fam} {who} client: {e:#}"));
        let out = client.output();
        assert!(
            out.contains(&format!("first peer {} {}", going.ip(), going.port())),
            "{fam} {who}: getpeername() must show the service (translated at connect):\n{out}"
        );
    }
    cluster.step(&format!(
        "{fam}: both clients' sockets are connected through {going} to {GOING}; control \
         sockets to {GOING}'s pod address"
    ));

    let removed = cluster.set_endpoints(vip, &[STAYING]);
    cluster.step(&format!(
        "{fam}: {GOING} left the EndpointSlice; agents synced"
    ));
    let back = format!("main ok {STAYING}");
    for (who, client) in &mut clients {
        let left = RECONNECT_WITHIN.saturating_sub(removed.elapsed());
        client.wait_for_output(&back, left).unwrap_or_else(|e| {
            panic!(
                "{fam} {who} client did not reach {STAYING} within {RECONNECT_WITHIN:?} of the \
                 removal: {e:#}\nnode1's agent:\n{}",
                cluster.agent(0).log()
            )
        });
    }
    cluster.step(&format!(
        "{fam}: both clients reach {STAYING} {:.0} ms after \
         the EndpointSlice was written",
        removed.elapsed().as_secs_f64() * 1e3
    ));
    // A few more exchanges on the control sockets after the destroy.
    std::thread::sleep(Duration::from_millis(500));

    for (who, client) in &clients {
        let out = client.output();
        let main = states(&out, "main");
        let expect: Vec<String> = if *who == "pod" && !k8s::pods_at_socket() {
            // --socket-lb host-only: the pod's socket is translated per packet; its flow's
            // conntrack entries are cleared and its next datagram goes to a live backend, with
            // no error and no reconnect.
            vec![format!("ok {GOING}"), format!("ok {STAYING}")]
        } else {
            vec![
                format!("ok {GOING}"),
                "error ECONNABORTED".to_owned(),
                format!("reconnected {} {}", going.ip(), going.port()),
                format!("ok {STAYING}"),
            ]
        };
        assert_eq!(
            main, expect,
            "{fam} {who}: the translated socket must be aborted once, then reconnect to the \
             service and reach {STAYING}:\n{out}"
        );
        assert_eq!(
            states(&out, "control"),
            [format!("ok {GOING}")],
            "{fam} {who}: the control socket, connected to {GOING}'s pod address directly, must \
             never be touched:\n{out}"
        );
    }
    let log = cluster.agent(0).log();
    // The host process's socket, and the pod's when pods are translated at the socket.
    let want = if k8s::pods_at_socket() {
        (2, 2)
    } else {
        (1, 1)
    };
    assert_eq!(
        destroy_lines(&log),
        [want],
        "{fam}: node1's agent destroys the translated sockets, in its own namespace and (pods \
         at the socket) the pod's, in one pass:\n{log}"
    );
    assert_eq!(
        destroy_lines(&cluster.agent(1).log()),
        [(0, 0)],
        "{fam}: node2 translated no socket: nothing to destroy"
    );
    cluster.step(&format!(
        "{fam}: node1's agent logged {} sockets destroyed in {} namespaces; control sockets \
         untouched",
        want.0, want.1
    ));
    drop(clients);
    let Cluster { servers, bed } = cluster;
    drop(servers);
    bed.finish();
}

fn python3() {
    let out = Command::new("python3")
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("running python3 (the test's client): {e}"));
    assert!(out.status.success(), "python3 --version failed: {out:?}");
}

#[test]
fn ipv4_connected_udp_sockets_of_a_removed_backend_are_destroyed_and_reconnect() {
    connected_udp_sockets_of_a_removed_backend_are_destroyed(vip4(53));
}

#[test]
fn ipv6_connected_udp_sockets_of_a_removed_backend_are_destroyed_and_reconnect() {
    connected_udp_sockets_of_a_removed_backend_are_destroyed(vip6(53));
}
