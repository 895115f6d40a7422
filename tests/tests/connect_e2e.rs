//! Connect-time translation end to end: `svc-agent run --cgroup <node1's cgroup>` on node1 of
//! the emulated cluster, a dual-stack `ClusterIP` Service with three backend pods (one on node1,
//! two on node2) and one without endpoints, and host-network client processes on node1.
//!
//! A client *in node1's cgroup* connects to the service address and reaches a backend (which
//! answers with its name); `getpeername()` reports the service address and port; UDP
//! `sendto()` the service + `recvfrom()` reports the service as the sender (also on a
//! connected UDP socket); over IPv4 and IPv6; connections spread over all three backends. A
//! service without endpoints refuses `connect()` and `sendto()` at once (`ECONNREFUSED`). The
//! same client *outside* the cgroup is not translated (node1 has no route to the service
//! range, so its connect fails at once).
//!
//! Needs root (namespaces, bpffs, cgroups, eBPF), `python3` (the client) and the agent binary
//! (`cargo build -p svc-agent`): fails, never skips, without them.

use std::{
    collections::BTreeMap,
    io::{ErrorKind, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use svc_agent::{inspect, loader::pin_dir};
use svc_common::{
    addr::{self, FAMILY_V4, FAMILY_V6},
    sock::{SockRevNatKey, SockRevNatValue},
    stats::PktCounter,
};
use svc_tests::netns::{self, Netns, Node, Pod, Process, Topology};

/// The dual-stack service with three backends.
const VIP4: &str = "198.19.0.10";
const VIP6: &str = "2001:db8:f::10";
/// The dual-stack service without endpoints.
const EMPTY4: &str = "198.19.0.11";
const EMPTY6: &str = "2001:db8:f::11";
/// Service ports and the backends' ports behind them.
const TCP_PORT: u16 = 80;
const TCP_TARGET: u16 = 5000;
const UDP_PORT: u16 = 53;
const UDP_TARGET: u16 = 5353;

/// TCP connections per family for the distribution check.
const TCP_CONNECTIONS: u32 = 45;
/// UDP request/response exchanges per family, on fresh unconnected sockets ...
const UDP_EXCHANGES: u32 = 12;
/// ... and on connected ones.
const UDP_CONNECTED: u32 = 3;
/// A refused connect must fail faster than this (no timeout, no retransmission).
const REFUSE_WITHIN: Duration = Duration::from_millis(500);
/// How long the agent may take to load, attach and program its maps.
const AGENT_START: Duration = Duration::from_secs(20);
/// How long one client run may take (every socket inside it has a 1-3 s timeout).
const CLIENT_RUN: Duration = Duration::from_secs(45);
/// The backend servers stop by themselves after this long at the latest.
const SERVER_LIFETIME: Duration = Duration::from_secs(150);
/// Bound on the servers' writes.
const IO_TIMEOUT: Duration = Duration::from_secs(3);

/// The client: runs `mode address port count` groups in order, prints one line per attempt,
/// then `DONE` and waits to be stopped (so its output is complete before it exits). Every
/// socket has a timeout; every loop is bounded by `count` and 3 attempts.
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
    for _ in range(n):
        s = socket.socket(family(ip), socket.SOCK_STREAM)
        s.settimeout(3)
        t = time.monotonic()
        try:
            s.connect((ip, port))
        except OSError as e:
            print("tcp-refused", err(e), "%.6f" % (time.monotonic() - t), flush=True)
            s.close()
            continue
        peer = s.getpeername()
        data = b""
        try:
            while len(data) < 256:
                chunk = s.recv(256)
                if not chunk:
                    break
                data += chunk
        except OSError as e:
            print("tcp-read-error", err(e), flush=True)
        s.close()
        print("tcp", peer[0], peer[1], first_word(data), flush=True)

def udp(ip, port, n):
    for i in range(n):
        s = socket.socket(family(ip), socket.SOCK_DGRAM)
        s.settimeout(1)
        line = ["udp-timeout"]
        for _ in range(3):
            t = time.monotonic()
            try:
                s.sendto(b"ping %d" % i, (ip, port))
            except OSError as e:
                line = ["udp-refused", err(e), "%.6f" % (time.monotonic() - t)]
                break
            try:
                data, sender = s.recvfrom(512)
            except socket.timeout:
                continue
            line = ["udp", sender[0], sender[1], first_word(data)]
            break
        s.close()
        print(*line, flush=True)

def udp_connected(ip, port, n):
    for _ in range(n):
        s = socket.socket(family(ip), socket.SOCK_DGRAM)
        s.settimeout(1)
        try:
            s.connect((ip, port))
        except OSError as e:
            print("udpc-refused", err(e), flush=True)
            s.close()
            continue
        peer = s.getpeername()
        line = ["udpc-timeout"]
        for _ in range(3):
            s.send(b"ping")
            try:
                data, sender = s.recvfrom(512)
            except socket.timeout:
                continue
            line = ["udpc", peer[0], peer[1], sender[0], sender[1], first_word(data)]
            break
        s.close()
        print(*line, flush=True)

MODES = {"tcp": tcp, "udp": udp, "udpc": udp_connected}
args = sys.argv[1:]
for i in range(0, len(args), 4):
    mode, ip, port, n = args[i:i + 4]
    MODES[mode](ip, int(port), int(n))
print("DONE", flush=True)
time.sleep(120)
"#;

fn must_be_root() {
    if let Err(e) = netns::require_root() {
        panic!("{e:#}");
    }
}

/// `target/<profile>/svc-agent`, next to this test's `deps` directory.
fn agent_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test binary")?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("the test binary has no target/<profile> directory")?;
    let agent = profile_dir.join("svc-agent");
    ensure!(
        agent.is_file(),
        "{} is missing: build it first with `cargo build -p svc-agent` (this test runs the real \
         agent binary)",
        agent.display()
    );
    Ok(agent)
}

fn python3() -> anyhow::Result<()> {
    let out = Command::new("python3")
        .arg("--version")
        .output()
        .context("running python3 (the test's client; install the python3 package)")?;
    ensure!(out.status.success(), "python3 --version failed: {out:?}");
    Ok(())
}

/// The Services and `EndpointSlice`s the agent reads: `web` with `backends`, `empty` without
/// any endpoint.
fn services_yaml(backends: &[(&Pod, &Node)]) -> String {
    let endpoints = |v6: bool| -> String {
        backends
            .iter()
            .map(|(pod, node)| {
                let ip = if v6 {
                    pod.ipv6.to_string()
                } else {
                    pod.ipv4.to_string()
                };
                format!(
                    "\n- {{addresses: [\"{ip}\"], conditions: {{ready: true}}, nodeName: {}}}",
                    node.name
                )
            })
            .collect::<Vec<_>>()
            .concat()
    };
    let service = |name: &str, v4: &str, v6: &str| {
        format!(
            r#"apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  type: ClusterIP
  clusterIP: {v4}
  clusterIPs: ["{v4}", "{v6}"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: PreferDualStack
  ports:
  - {{name: http, port: {TCP_PORT}, protocol: TCP, targetPort: {TCP_TARGET}}}
  - {{name: dns, port: {UDP_PORT}, protocol: UDP, targetPort: {UDP_TARGET}}}
"#
        )
    };
    let slice = |family: &str, v6: bool| {
        format!(
            r"apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-{family}, namespace: default, labels: {{kubernetes.io/service-name: web}}}}
addressType: {}
endpoints:{}
ports:
- {{name: http, port: {TCP_TARGET}, protocol: TCP}}
- {{name: dns, port: {UDP_TARGET}, protocol: UDP}}
",
            if v6 { "IPv6" } else { "IPv4" },
            endpoints(v6)
        )
    };
    [
        service("web", VIP4, VIP6),
        slice("v4", false),
        slice("v6", true),
        service("empty", EMPTY4, EMPTY6),
    ]
    .join("---\n")
}

/// TCP and UDP servers in the backend pods, served by one thread of the test: each answers
/// with its pod's name. Stopped when dropped (or after [`SERVER_LIFETIME`]).
struct Servers {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Servers {
    fn start(pods: &[Pod]) -> anyhow::Result<Self> {
        let mut tcp = Vec::new();
        let mut udp = Vec::new();
        for pod in pods {
            for ip in [IpAddr::from(pod.ipv4), IpAddr::from(pod.ipv6)] {
                let (listener, socket) = pod.ns.run(|| {
                    let listener = TcpListener::bind(SocketAddr::new(ip, TCP_TARGET))?;
                    listener.set_nonblocking(true)?;
                    let socket = UdpSocket::bind(SocketAddr::new(ip, UDP_TARGET))?;
                    socket.set_nonblocking(true)?;
                    Ok((listener, socket))
                })?;
                tcp.push((pod.name.clone(), listener));
                udp.push((pod.name.clone(), socket));
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("backends".into())
            .spawn(move || serve(&tcp, &udp, &flag))
            .context("starting the server thread")?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the servers and reports the first error they met.
    fn stop(mut self) -> anyhow::Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => bail!("the server thread panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            eprintln!("backend servers: {e:#}");
        }
    }
}

fn serve(
    tcp: &[(String, TcpListener)],
    udp: &[(String, UdpSocket)],
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + SERVER_LIFETIME;
    let mut buf = [0u8; 512];
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let mut busy = false;
        for (name, listener) in tcp {
            match listener.accept() {
                Ok((mut conn, _)) => {
                    busy = true;
                    conn.set_nonblocking(false)?;
                    conn.set_write_timeout(Some(IO_TIMEOUT))?;
                    // A client that gave up already is its own failure; keep serving.
                    let _ = conn.write_all(format!("{name}\n").as_bytes());
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e).context("accept"),
            }
        }
        for (name, socket) in udp {
            match socket.recv_from(&mut buf) {
                Ok((n, from)) => {
                    busy = true;
                    let reply = format!("{name} {}", String::from_utf8_lossy(&buf[..n]));
                    socket
                        .send_to(reply.as_bytes(), from)
                        .with_context(|| format!("UDP reply to {from}"))?;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e).context("UDP receive"),
            }
        }
        if !busy {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    Ok(())
}

/// Runs the client with `groups` (`mode address port count`) in `ns`, in `cgroup` when given,
/// and returns its output lines (without `DONE`).
fn run_client(
    script: &Path,
    ns: &Netns,
    cgroup: Option<&Path>,
    groups: &[(&str, &str, u16, u32)],
) -> anyhow::Result<Vec<String>> {
    let mut command = Command::new("python3");
    command.arg(script);
    for (mode, ip, port, count) in groups {
        command.args([
            (*mode).to_owned(),
            (*ip).to_owned(),
            port.to_string(),
            count.to_string(),
        ]);
    }
    let mut client = ns.spawn(&command, cgroup)?;
    client.wait_for_output("DONE", CLIENT_RUN)?;
    let output = client.output();
    client.stop()?;
    Ok(output
        .lines()
        .take_while(|l| *l != "DONE")
        .map(str::to_owned)
        .collect())
}

/// The client's `tcp` lines: backend name per connection; fails unless every one connected
/// and reported `vip:port` as its peer.
fn tcp_names(lines: &[String], vip: &str, port: u16) -> anyhow::Result<Vec<String>> {
    let vip: IpAddr = vip.parse()?;
    lines
        .iter()
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            match f.as_slice() {
                ["tcp", peer, peer_port, name] => {
                    ensure!(
                        peer.parse::<IpAddr>()? == vip && peer_port.parse::<u16>()? == port,
                        "getpeername() reported {peer} port {peer_port}, expected {vip} port {port}"
                    );
                    ensure!(*name != "-", "connected to {vip}, but no backend answered");
                    Ok((*name).to_owned())
                }
                _ => bail!("TCP to {vip} port {port} failed: {line}"),
            }
        })
        .collect()
}

/// The client's `udp` / `udpc` lines: backend name per exchange; fails unless every answer
/// came from `vip:port` (and, connected, `getpeername()` said so too).
fn udp_names(lines: &[String], vip: &str, port: u16) -> anyhow::Result<Vec<String>> {
    let vip: IpAddr = vip.parse()?;
    let is = |ip: &str, p: &str| -> anyhow::Result<bool> {
        Ok(ip.parse::<IpAddr>()? == vip && p.parse::<u16>()? == port)
    };
    lines
        .iter()
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            match f.as_slice() {
                ["udp", from, from_port, name] => {
                    ensure!(
                        is(from, from_port)?,
                        "recvfrom() reported the sender {from} port {from_port}, expected {vip} \
                         port {port}"
                    );
                    Ok((*name).to_owned())
                }
                ["udpc", peer, peer_port, from, from_port, name] => {
                    ensure!(
                        is(peer, peer_port)?,
                        "getpeername() of a connected UDP socket reported {peer} port \
                         {peer_port}, expected {vip} port {port}"
                    );
                    ensure!(
                        is(from, from_port)?,
                        "recvfrom() on a connected UDP socket reported {from} port {from_port}, \
                         expected {vip} port {port}"
                    );
                    Ok((*name).to_owned())
                }
                _ => bail!("UDP to {vip} port {port} failed: {line}"),
            }
        })
        .collect()
}

fn count(names: &[String]) -> BTreeMap<String, u32> {
    let mut counts = BTreeMap::new();
    for name in names {
        *counts.entry(name.clone()).or_insert(0) += 1;
    }
    counts
}

/// `SOCK_REVNAT_V1` as the agent pinned it: (backend address, backend port) -> (service
/// address, service port), over every socket.
fn revnat_entries(bpffs: &Path) -> anyhow::Result<Vec<(SockRevNatKey, SockRevNatValue)>> {
    let path = pin_dir(bpffs).join("SOCK_REVNAT_V1");
    let data =
        MapData::from_pin(&path).with_context(|| format!("opening pinned {}", path.display()))?;
    let map: BpfHashMap<_, SockRevNatKey, SockRevNatValue> =
        BpfHashMap::try_from(Map::LruHashMap(data))?;
    map.iter()
        .collect::<Result<Vec<_>, _>>()
        .context("reading SOCK_REVNAT_V1")
}

/// Refusals of connections to services without endpoints (`rejected`, like the packet
/// path's resets and port unreachables).
fn no_endpoint_drops(bpffs: &Path) -> anyhow::Result<u64> {
    Ok(inspect::read_pkt_stats(bpffs)?
        .iter()
        .find(|(c, _)| *c == PktCounter::Rejected)
        .map_or(0, |(_, c)| c.packets))
}

fn map_addr(ip: IpAddr) -> (addr::Addr, u8) {
    match ip {
        IpAddr::V4(v4) => (addr::from_v4(v4.octets()), FAMILY_V4),
        IpAddr::V6(v6) => (v6.octets(), FAMILY_V6),
    }
}

/// What the checks share: the client script, node1, the backend pods, the test's clock.
struct Run {
    script: PathBuf,
    node: Node,
    pods: Vec<Pod>,
    started: Instant,
}

impl Run {
    fn step(&self, what: &str) {
        println!("[{:>6.2}s] {what}", self.started.elapsed().as_secs_f64());
    }

    /// The client in node1's namespace and cgroup.
    fn client(&self, groups: &[(&str, &str, u16, u32)]) -> anyhow::Result<Vec<String>> {
        run_client(&self.script, &self.node.ns, Some(&self.node.cgroup), groups)
    }

    fn backend_names(&self) -> Vec<String> {
        self.pods.iter().map(|p| p.name.clone()).collect()
    }

    /// TCP: connect, getpeername, the backend's name; spread over the three backends.
    fn check_tcp(&self) {
        let all = self.backend_names();
        for vip in [VIP4, VIP6] {
            let t = Instant::now();
            let lines = self
                .client(&[("tcp", vip, TCP_PORT, TCP_CONNECTIONS)])
                .unwrap_or_else(|e| panic!("TCP client to {vip}: {e:#}"));
            let names = tcp_names(&lines, vip, TCP_PORT).unwrap_or_else(|e| panic!("{e:#}"));
            assert_eq!(names.len(), TCP_CONNECTIONS as usize, "{lines:?}");
            let counts = count(&names);
            self.step(&format!(
                "TCP {vip}:{TCP_PORT}: {} connections in {:.2}s, getpeername() = service, \
                 backends {counts:?}",
                names.len(),
                t.elapsed().as_secs_f64()
            ));
            for name in &all {
                let got = counts.get(name).copied().unwrap_or(0);
                assert!(
                    got > 0 && got < TCP_CONNECTIONS * 4 / 5,
                    "degenerate spread over backends for {vip}: {counts:?}"
                );
            }
        }
    }

    /// UDP: sendto + recvfrom on fresh sockets, and on a connected socket.
    fn check_udp(&self) {
        let all = self.backend_names();
        for vip in [VIP4, VIP6] {
            let lines = self
                .client(&[
                    ("udp", vip, UDP_PORT, UDP_EXCHANGES),
                    ("udpc", vip, UDP_PORT, UDP_CONNECTED),
                ])
                .unwrap_or_else(|e| panic!("UDP client to {vip}: {e:#}"));
            let names = udp_names(&lines, vip, UDP_PORT).unwrap_or_else(|e| panic!("{e:#}"));
            assert_eq!(
                names.len(),
                (UDP_EXCHANGES + UDP_CONNECTED) as usize,
                "{lines:?}"
            );
            assert!(
                names.iter().all(|n| all.contains(n)),
                "unknown responder: {names:?}"
            );
            self.step(&format!(
                "UDP {vip}:{UDP_PORT}: {} exchanges, recvfrom() sender = service (also \
                 connected: getpeername() = service), backends {:?}",
                names.len(),
                count(&names)
            ));
        }
    }

    /// The reverse entries the programs wrote: backend -> service, per socket.
    fn check_revnat_map(&self) {
        let entries = revnat_entries(&self.node.bpffs).expect("reading SOCK_REVNAT_V1");
        for (vip, port, target) in [
            (VIP4, TCP_PORT, TCP_TARGET),
            (VIP6, TCP_PORT, TCP_TARGET),
            (VIP4, UDP_PORT, UDP_TARGET),
            (VIP6, UDP_PORT, UDP_TARGET),
        ] {
            let (vip_addr, family) = map_addr(vip.parse().unwrap());
            let backend_addrs: Vec<addr::Addr> = self
                .pods
                .iter()
                .map(|p| {
                    let ip = if family == FAMILY_V4 {
                        IpAddr::from(p.ipv4)
                    } else {
                        p.ipv6.into()
                    };
                    map_addr(ip).0
                })
                .collect();
            let matching = entries
                .iter()
                .filter(|(k, v)| {
                    k.family == family
                        && k.port.to_host() == target
                        && backend_addrs.contains(&k.addr)
                        && v.addr == vip_addr
                        && v.port.to_host() == port
                })
                .count();
            assert!(
                matching > 0,
                "no SOCK_REVNAT_V1 entry backend:{target} -> {vip}:{port} among {} entries",
                entries.len()
            );
        }
        self.step(&format!(
            "SOCK_REVNAT_V1 holds {} reverse entries (backend -> service per socket)",
            entries.len()
        ));
    }

    /// No endpoints: `connect()` and `sendto()` refused at once, and counted.
    fn check_refusal(&self) {
        let before = no_endpoint_drops(&self.node.bpffs).expect("reading drop counters");
        let lines = self
            .client(&[
                ("tcp", EMPTY4, TCP_PORT, 1),
                ("tcp", EMPTY6, TCP_PORT, 1),
                ("udp", EMPTY4, UDP_PORT, 1),
                ("udp", EMPTY6, UDP_PORT, 1),
            ])
            .expect("client to the service without endpoints");
        assert_eq!(lines.len(), 4, "{lines:?}");
        for line in &lines {
            let f: Vec<&str> = line.split_whitespace().collect();
            match f.as_slice() {
                ["tcp-refused" | "udp-refused", "ECONNREFUSED", secs] => {
                    let took = Duration::from_secs_f64(secs.parse().unwrap());
                    assert!(
                        took < REFUSE_WITHIN,
                        "refused, but only after {took:?}: {line}"
                    );
                }
                _ => panic!(
                    "a service without endpoints must refuse at once with ECONNREFUSED: {line}"
                ),
            }
        }
        let drops = no_endpoint_drops(&self.node.bpffs).expect("reading drop counters") - before;
        assert_eq!(drops, 4, "rejected moved by {drops}, want 4");
        self.step(&format!(
            "no endpoints: connect() and sendto() refused with ECONNREFUSED ({}), \
             rejected +{drops}",
            lines.join("; ")
        ));
    }

    /// The same client outside node1's cgroup (node1's namespace only) is not translated:
    /// node1 has no route to the service range, so its connects fail at once.
    fn check_outside_cgroup(&self) {
        let lines = run_client(
            &self.script,
            &self.node.ns,
            None,
            &[("tcp", VIP4, TCP_PORT, 1), ("tcp", VIP6, TCP_PORT, 1)],
        )
        .expect("client outside the cgroup");
        assert_eq!(lines.len(), 2, "{lines:?}");
        for line in &lines {
            assert!(
                line.starts_with("tcp-refused ") && !line.contains("ECONNREFUSED"),
                "a process outside the cgroup must not be translated: {line}"
            );
        }
        self.step(&format!(
            "outside the cgroup: not translated ({})",
            lines.join("; ")
        ));
    }
}

/// Starts `svc-agent run` on `node` (in its namespace and cgroup) with the services in `dir`
/// and connect-time translation for the node's cgroup; waits until it says it is running.
fn start_agent(agent: &Path, node: &Node, dir: &Path) -> anyhow::Result<Process> {
    let mut command = Command::new(agent);
    command
        .arg("--bpffs")
        .arg(&node.bpffs)
        .args(["run", "--node-name", &node.name, "--pod-ifaces", "svcpod*"])
        .arg("--from-dir")
        .arg(dir)
        .arg("--cgroup")
        .arg(&node.cgroup)
        .args([
            "--max-service-entries",
            "4096",
            "--max-backends",
            "4096",
            "--max-conntrack-entries",
            "16384",
        ])
        .env("RUST_LOG", "info");
    let mut process = node.spawn(&command)?;
    process.wait_for_output("svc-agent running", AGENT_START)?;
    Ok(process)
}

#[test]
fn host_processes_in_the_node_cgroup_reach_cluster_ips_through_connect_time_translation() {
    must_be_root();
    let agent = agent_binary().unwrap_or_else(|e| panic!("{e:#}"));
    python3().unwrap_or_else(|e| panic!("{e:#}"));
    let started = Instant::now();

    let mut topo = Topology::new().expect("building the topology");
    let pods = vec![
        topo.add_pod(0, "backend-a").expect("adding backend-a"),
        topo.add_pod(1, "backend-b").expect("adding backend-b"),
        topo.add_pod(1, "backend-c").expect("adding backend-c"),
    ];
    let run = Run {
        script: topo.run_dir().join("client.py"),
        node: topo.node(0).clone(),
        pods,
        started,
    };
    run.step(&format!(
        "topology {} up; backends {}",
        topo.prefix(),
        run.pods
            .iter()
            .map(|p| format!("{} {}/{} on node{}", p.name, p.ipv4, p.ipv6, p.node + 1))
            .collect::<Vec<_>>()
            .join(", ")
    ));

    let dir = topo.run_dir().join("services");
    std::fs::create_dir_all(&dir).expect("creating the services directory");
    let backends: Vec<(&Pod, &Node)> = run.pods.iter().map(|p| (p, topo.node(p.node))).collect();
    std::fs::write(dir.join("services.yaml"), services_yaml(&backends))
        .expect("writing services.yaml");
    std::fs::write(&run.script, CLIENT_PY).expect("writing the client");
    let servers = Servers::start(&run.pods).expect("starting the backend servers");
    let agent_process = start_agent(&agent, &run.node, &dir).expect("starting svc-agent");
    run.step(&format!(
        "svc-agent running on {}, connect-time programs on {}",
        run.node.name,
        run.node.cgroup.display()
    ));

    run.check_tcp();
    run.check_udp();
    run.check_revnat_map();
    run.check_refusal();
    run.check_outside_cgroup();

    servers.stop().expect("backend servers");
    let status = agent_process.stop().expect("stopping svc-agent");
    assert!(
        status.success(),
        "svc-agent must stop cleanly on SIGTERM: {status}"
    );
    let prefix = topo.prefix().to_owned();
    drop(topo);
    let left = netns::leftovers(&prefix).expect("listing leftovers");
    assert!(left.is_empty(), "leftovers of {prefix}: {left:?}");
    run.step(&format!("stopped; nothing of {prefix} remains"));
}
