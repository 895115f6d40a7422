//! The TC path's connection tracking end to end, through the real agent (two emulated nodes,
//! one `svc-agent run --from-dir` each, servers in backend pods, a client pod on node1):
//! - the pod programs let untouched packets continue the hook's chain (`TCX_NEXT`), so a
//!   classic tc filter behind them sees the pod's traffic;
//! - a half-closed connection (the client shut down its side) keeps its backend while the
//!   server goes on sending after more than the 10 s close timeout;
//! - a client reusing its source port within the close timeout opens a new connection, which
//!   never reaches an endpoint removed from the Service meanwhile (even one that stays the
//!   backend of another Service);
//! - a client reusing its source port towards another Service with the same endpoint gets its
//!   answers from that Service's address (the endpoint sees the same tuple again); while the
//!   first connection is alive, the second is refused (counted) and the first keeps working;
//! - a flood of spoofed SYNs into small connection tables breaks no established connection.
//!
//! Pods reach services at the socket in mode `all` (their connections are then not tracked per
//! packet) and per packet in `host-only` (`SVC_TEST_SOCKET_LB`): every case runs in both and
//! must pass in both; the TC path is what `host-only` exercises. Every loop is bounded, every
//! socket operation has a timeout, and the topology is removed at the end (also on failure).

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use svc_tests::{
    k8s::{
        self, Agent, Backends, EndpointSlice, ManifestDir, Programmed, Protocol, Service,
        TcpSession, frontend_key,
    },
    netns::{Pod, sockd},
    testbed::{TestBed, vip4},
};

/// Bound on every connect, read and write that is expected to succeed.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the agents may take to apply a change of the directory.
const SYNC_TIMEOUT: Duration = Duration::from_secs(5);
/// The backends' port.
const BACKEND_PORT: u16 = 8080;
/// The Services' port.
const SERVICE_PORT: u16 = 80;
/// Half-close case: how long the servers stay quiet after the client shut its side down
/// (beyond the 10 s close timeout) ...
const PAUSE: Duration = Duration::from_secs(11);
/// ... and how much they send then (the client's ACKs of it find the flow's forward entry).
const BULK: usize = 4 << 20;
/// SYN-flood case: established connections, and spoofed SYNs.
const CONNECTIONS: usize = 50;
const FLOOD: u32 = 20_000;

/// One test's cluster: servers drop first, then agents and topology.
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
    fn new(pods: &[(usize, &str)]) -> Self {
        Self {
            backends: Backends::new(),
            bed: TestBed::new(pods),
        }
    }

    fn write(&self, file: &str, docs: &[String]) {
        self.bed
            .manifests
            .write(file, &k8s::documents(docs))
            .unwrap_or_else(|e| panic!("writing {file}: {e:#}"));
    }

    /// `svc`'s IPv4 slice with `pods` ready.
    fn slice(&self, svc: &Service, pods: &[&str]) -> String {
        let pods: Vec<&Pod> = pods.iter().map(|n| self.pod(n)).collect();
        EndpointSlice::new(&svc.name, false)
            .ports_of(svc, &[])
            .ready_pods(&self.bed.topo, pods)
            .to_yaml()
    }

    /// Serves the echo protocol on `pod`'s IPv4 address, answering as `pod`'s name.
    fn serve(&self, pod: &str) {
        self.serve_pods(&self.backends, &[pod], BACKEND_PORT);
    }

    /// Starts the agents with `sizes` (flags this agent lacks are left out).
    fn start_agents_sized(&mut self, sizes: &[(&str, u32)]) {
        for node in self.bed.topo.nodes() {
            let agent = Agent::start_sized(&self.bed.agent_bin, node, self.manifests.path(), sizes)
                .unwrap_or_else(|e| panic!("starting svc-agent on {}: {e:#}", node.name));
            self.bed.agents.push(agent);
        }
        self.step(&format!("svc-agent running with {sizes:?}"));
    }

    /// Runs `f` in the client pod's namespace.
    fn in_client<T: Send>(&self, f: impl FnOnce() -> anyhow::Result<T> + Send) -> T {
        self.pod("client")
            .ns
            .run(f)
            .unwrap_or_else(|e| panic!("{e:#}{}", self.diag()))
    }

    /// Makes a change to the directory and waits (bounded) until both agents synced it and
    /// node1 programs what `done` wants.
    fn edit(
        &mut self,
        what: &str,
        change: impl FnOnce(&ManifestDir) -> anyhow::Result<()>,
        done: impl Fn(&Programmed) -> bool,
    ) {
        let before: Vec<usize> = self.bed.agents.iter().map(Agent::syncs).collect();
        change(&self.bed.manifests).unwrap_or_else(|e| panic!("{what}: {e:#}"));
        for (agent, before) in self.bed.agents.iter_mut().zip(before) {
            agent
                .wait_syncs(before + 1, SYNC_TIMEOUT)
                .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        }
        let deadline = Instant::now() + SYNC_TIMEOUT;
        while !done(&self.programmed(0)) {
            assert!(Instant::now() < deadline, "{what}: node1 never got there");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.step(what);
    }

    /// `pods`' IPv4 addresses with the backend port, as `inspect services` prints them.
    fn backend_set(&self, pods: &[&str]) -> std::collections::BTreeSet<String> {
        pods.iter()
            .map(|p| SocketAddr::new(self.pod(p).ipv4.into(), BACKEND_PORT).to_string())
            .collect()
    }

    fn finish(self) {
        drop(self.backends);
        self.bed.finish();
    }
}

/// `ClusterIP` Service `name` on `vip`, TCP port 80 -> 8080.
fn service(name: &str, vip: IpAddr) -> Service {
    Service::cluster_ip(name, &[vip]).port("tcp", Protocol::Tcp, SERVICE_PORT, BACKEND_PORT)
}

/// `Sent <bytes> bytes <packets> pkt` summed over the qdiscs of `tc -s qdisc show`.
fn tc_packets(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let i = words.iter().position(|w| *w == "Sent")?;
            (words.get(i + 4) == Some(&"pkt"))
                .then(|| words.get(i + 3)?.parse::<u64>().ok())
                .flatten()
        })
        .sum()
}

#[test]
fn a_tc_filter_behind_the_pod_programs_sees_the_pods_traffic() {
    let mut c = Cluster::new(&[(0, "client"), (0, "web-0"), (1, "web-1")]);
    let vip = vip4(60);
    let svc = service("web", vip);
    c.write(
        "web.yaml",
        &[svc.to_yaml(), c.slice(&svc, &["web-0", "web-1"])],
    );
    c.serve("web-0");
    c.serve("web-1");
    c.bed.start_agents();
    // Classic tc filters on the client's host-side veth, both directions (a clsact qdisc with
    // a u32 filter matching everything: this kernel has no matchall and no gact). They run
    // after the hook's TCX programs, and only for packets those let continue (TCX_NEXT), not
    // for packets they end the chain with (TCX_PASS / TC_ACT_OK); the clsact qdisc counts
    // every packet its filters see.
    let node = &c.topo.node(0).ns;
    let host_if = c.pod("client").host_ifname.clone();
    node.exec(["tc", "qdisc", "add", "dev", &host_if, "clsact"])
        .expect("adding clsact");
    for hook in ["ingress", "egress"] {
        node.exec([
            "tc", "filter", "add", "dev", &host_if, hook, "protocol", "all", "u32", "match", "u32",
            "0", "0", "classid", "1:1",
        ])
        .unwrap_or_else(|e| panic!("adding a u32 filter on {hook}: {e:#}"));
    }
    let count = || {
        tc_packets(
            &node
                .exec(["tc", "-s", "qdisc", "show", "dev", &host_if])
                .unwrap_or_else(|e| panic!("tc qdisc show: {e:#}")),
        )
    };
    let before = count();
    // Pod to pod (never translated), then through the service (translated in host-only).
    let web1 = SocketAddr::new(c.pod("web-1").ipv4.into(), BACKEND_PORT);
    let dst = SocketAddr::new(vip, SERVICE_PORT);
    c.in_client(move || {
        for i in 0..5 {
            k8s::tcp_request(web1, &format!("direct-{i}"), IO_TIMEOUT)?;
            k8s::tcp_request(dst, &format!("vip-{i}"), IO_TIMEOUT)?;
        }
        Ok(())
    });
    let seen = count() - before;
    c.step(&format!(
        "the filters behind the programs saw {seen} packets of 10 connections"
    ));
    // Each connection is at least SYN, ACK, request, FIN, ACK from the pod and SYN-ACK,
    // answer, FIN, ACK to it.
    assert!(
        seen >= 90,
        "the tc filters behind the pod programs saw {seen} packets of 10 connections: the \
         programs end the chain{}",
        c.diag()
    );
    c.finish();
}

/// Servers for the half-close case: each connection reads the request to its end (the client
/// shuts its side down), answers with its label, goes quiet for `pause`, then sends `bulk`
/// bytes and closes.
struct SlowServers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl SlowServers {
    fn start(c: &Cluster, pods: &[&str], pause: Duration, bulk: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for pod in pods {
            let p = c.pod(pod);
            let addr = SocketAddr::new(p.ipv4.into(), BACKEND_PORT);
            let listener =
                p.ns.run(move || {
                    let l = TcpListener::bind(addr).context("bind")?;
                    l.set_nonblocking(true)?;
                    Ok(l)
                })
                .unwrap_or_else(|e| panic!("listening on {pod}: {e:#}"));
            let (stop, label) = (Arc::clone(&stop), (*pod).to_owned());
            threads.push(std::thread::spawn(move || {
                let mut conns = Vec::new();
                // Bounded: at most 60 s of accepting, stopped earlier by `stop`.
                let deadline = Instant::now() + Duration::from_mins(1);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    match listener.accept() {
                        Ok((s, _)) => {
                            let label = label.clone();
                            conns.push(std::thread::spawn(move || {
                                let _ = serve_slowly(s, &label, pause, bulk);
                            }));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
                for t in conns {
                    let _ = t.join();
                }
            }));
        }
        Self { stop, threads }
    }
}

impl Drop for SlowServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn serve_slowly(mut s: TcpStream, label: &str, pause: Duration, bulk: usize) -> anyhow::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut request = Vec::new();
    s.read_to_end(&mut request)?;
    s.write_all(format!("{label}\n").as_bytes())?;
    std::thread::sleep(pause);
    s.write_all(&vec![b'x'; bulk])?;
    Ok(())
}

#[test]
fn a_half_closed_connection_keeps_its_backend_past_the_close_timeout() {
    let mut c = Cluster::new(&[(0, "client"), (0, "web-0"), (1, "web-1"), (0, "web-2")]);
    let vip = vip4(61);
    let svc = service("web", vip);
    let pods = ["web-0", "web-1", "web-2"];
    c.write("web.yaml", &[svc.to_yaml(), c.slice(&svc, &pods)]);
    let servers = SlowServers::start(&c, &pods, PAUSE, BULK);
    c.bed.start_agents();
    let dst = SocketAddr::new(vip, SERVICE_PORT);
    // Four connections at once: each would land on another backend with probability 2/3 if
    // its flow were forgotten (all four surviving by chance: 1/81).
    let results = c.in_client(move || {
        let mut streams = Vec::new();
        for i in 0..4 {
            let socket = sockd::socket(socket2::Domain::IPV4, socket2::Type::STREAM)?;
            socket.connect_timeout(&dst.into(), IO_TIMEOUT)?;
            let mut s = TcpStream::from(socket);
            s.set_read_timeout(Some(PAUSE + Duration::from_secs(4)))?;
            s.write_all(format!("request-{i}").as_bytes())?;
            s.shutdown(Shutdown::Write)?;
            streams.push(s);
        }
        let readers: Vec<_> = streams
            .into_iter()
            .map(|mut s| {
                std::thread::spawn(move || -> anyhow::Result<(String, usize)> {
                    let mut all = Vec::new();
                    // Bounded by the read timeout and the server's fixed amount.
                    s.read_to_end(&mut all).context("reading the answer")?;
                    let end = all.iter().position(|b| *b == b'\n').context("no label")?;
                    let label = String::from_utf8_lossy(&all[..end]).into_owned();
                    Ok((label, all.len() - end - 1))
                })
            })
            .collect();
        readers
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|_| bail!("reader panicked")))
            .collect::<Vec<_>>()
            .into_iter()
            .collect::<anyhow::Result<Vec<_>>>()
    });
    drop(servers);
    c.step(&format!(
        "4 half-closed connections after a {PAUSE:?} pause: {results:?}"
    ));
    for (label, bytes) in &results {
        assert_eq!(
            *bytes,
            BULK,
            "the connection on {label} lost data after the pause{}",
            c.diag()
        );
    }
    let stats = c.stats(0);
    assert_eq!(
        stats.get("ct_miss_midflow").copied().unwrap_or(0),
        0,
        "a half-closed flow lost its entry{}",
        c.diag()
    );
    c.finish();
}

/// How a client connection ends.
#[derive(Clone, Copy, Debug)]
enum Close {
    /// `SO_LINGER` 0: a reset, no `TIME_WAIT`.
    Reset,
    /// Shut down, read the server's FIN, close (the client keeps `TIME_WAIT`; the client
    /// namespace allows its reuse with `tcp_tw_reuse`).
    Fin,
}

/// A connection to `dst` from local port `port` (`SO_REUSEADDR`, as every socket sharing the
/// port must have).
fn connect_from(port: u16, dst: SocketAddr) -> anyhow::Result<TcpStream> {
    let socket = sockd::socket(socket2::Domain::IPV4, socket2::Type::STREAM)?;
    socket.set_reuse_address(true)?;
    let local: SocketAddr = (std::net::Ipv4Addr::UNSPECIFIED, port).into();
    socket.bind(&local.into()).context("bind")?;
    socket
        .connect_timeout(&dst.into(), IO_TIMEOUT)
        .with_context(|| format!("connect from port {port}"))?;
    let s = TcpStream::from(socket);
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// Sends one line on `s` and returns the label of the answer line.
fn ask_line(s: &mut TcpStream, line: &str) -> anyhow::Result<String> {
    s.write_all(format!("{line}\n").as_bytes())?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 256];
    // Bounded: one line of at most 256 bytes, each read within the timeout.
    while !answer.contains(&b'\n') && answer.len() < 256 {
        let n = s.read(&mut buf)?;
        ensure!(n > 0, "closed before answering");
        answer.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&answer)
        .split(' ')
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// One request to `dst` from local port `port` (`SO_REUSEADDR`), closed as `close` says;
/// returns the label that answered.
fn ask_from(port: u16, dst: SocketAddr, close: Close) -> anyhow::Result<String> {
    let mut s = connect_from(port, dst)?;
    let label = ask_line(&mut s, "hello")?;
    match close {
        Close::Reset => socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?,
        Close::Fin => {
            s.shutdown(Shutdown::Write)?;
            let mut rest = Vec::new();
            s.read_to_end(&mut rest)?;
        }
    }
    drop(s);
    Ok(label)
}

#[test]
fn a_reused_source_port_never_reaches_a_removed_endpoint() {
    let mut c = Cluster::new(&[(0, "client"), (0, "web-0"), (1, "web-1")]);
    let (vip, keep_vip) = (vip4(62), vip4(63));
    let web = service("web", vip);
    // `keep` keeps web-0 a backend of something, so its address and port stay in the maps.
    let keep = service("keep", keep_vip);
    c.write(
        "web.yaml",
        &[web.to_yaml(), c.slice(&web, &["web-0", "web-1"])],
    );
    c.write("keep.yaml", &[keep.to_yaml(), c.slice(&keep, &["web-0"])]);
    c.serve("web-0");
    c.serve("web-1");
    c.bed.start_agents();
    c.pod("client")
        .ns
        .sysctl(&["net.ipv4.tcp_tw_reuse=1"])
        .expect("tcp_tw_reuse in the client");
    let dst = SocketAddr::new(vip, SERVICE_PORT);
    // One port per way of closing whose connection landed on web-0 (each try from a new
    // port: 40 tries miss web-0 with probability 2^-40).
    let ports = c.in_client(move || {
        let mut found = Vec::new();
        for close in [Close::Reset, Close::Fin] {
            let port = (0..40u16)
                .map(|i| 30000 + 100 * (close as u16) + i)
                .find(|p| ask_from(*p, dst, close).is_ok_and(|l| l == "web-0"))
                .context("no connection landed on web-0")?;
            found.push((close, port));
        }
        Ok(found)
    });
    let closed = Instant::now();
    let key = frontend_key(dst, Protocol::Tcp);
    let want = c.backend_set(&["web-1"]);
    let slice = c.slice(&web, &["web-1"]);
    c.edit(
        "web-0 removed from web (still the endpoint of keep)",
        |m| m.write("web.yaml", &k8s::documents(&[web.to_yaml(), slice])),
        |p| p.backends(&key).as_ref() == Some(&want),
    );
    // Reconnect from the same ports, well within the 10 s close timeout (tcp_tw_reuse needs a
    // second since the last timestamp).
    std::thread::sleep(Duration::from_millis(1100).saturating_sub(closed.elapsed()));
    let again = c.in_client(move || {
        ports
            .into_iter()
            .map(|(close, port)| Ok((close, port, ask_from(port, dst, Close::Reset)?)))
            .collect::<anyhow::Result<Vec<_>>>()
    });
    c.step(&format!(
        "reconnected {:.1} s after closing: {again:?}",
        closed.elapsed().as_secs_f64()
    ));
    assert!(
        closed.elapsed() < Duration::from_secs(10),
        "too slow to test"
    );
    for (close, port, label) in &again {
        assert_eq!(
            label,
            "web-1",
            "a new connection from port {port} (the old one ended by {close:?}) reached the \
             removed endpoint{}",
            c.diag()
        );
    }
    c.finish();
}

/// How long a connection may take that must succeed at once (no SYN retransmission: the
/// first retransmission comes after 1 s).
const AT_ONCE: Duration = Duration::from_millis(900);

#[test]
fn a_source_port_reused_towards_another_service_with_the_same_endpoint_gets_its_answers() {
    let mut c = Cluster::new(&[(0, "client"), (1, "web-0")]);
    let (web_vip, keep_vip) = (vip4(66), vip4(67));
    // Two Services, one endpoint: web-0:8080 sees a client port used towards either VIP as
    // one tuple.
    let web = service("web", web_vip);
    let keep = service("keep", keep_vip);
    c.write("web.yaml", &[web.to_yaml(), c.slice(&web, &["web-0"])]);
    c.write("keep.yaml", &[keep.to_yaml(), c.slice(&keep, &["web-0"])]);
    c.serve("web-0");
    c.bed.start_agents();
    let (web_dst, keep_dst) = (
        SocketAddr::new(web_vip, SERVICE_PORT),
        SocketAddr::new(keep_vip, SERVICE_PORT),
    );
    // Ended connections: each way of closing, then the same port towards the other VIP at
    // once (well within the 10 s close timeout), in both orders.
    let took = c.in_client(move || {
        let mut took = Vec::new();
        for (i, close) in [Close::Reset, Close::Fin].into_iter().enumerate() {
            let port = 31000 + 10 * i as u16;
            for (first, second) in [(web_dst, keep_dst), (keep_dst, web_dst)] {
                ask_from(port, first, close).with_context(|| format!("to {first}"))?;
                let started = Instant::now();
                ask_from(port, second, Close::Reset).with_context(|| {
                    format!("from port {port} to {second} just after {first} ({close:?})")
                })?;
                took.push((close, first, started.elapsed()));
            }
        }
        Ok(took)
    });
    c.step(&format!("port reused towards the other VIP: {took:?}"));
    for (close, first, t) in &took {
        assert!(
            *t < AT_ONCE,
            "the connection after one to {first} ({close:?}) needed a retransmission: {t:?}{}",
            c.diag()
        );
    }
    // A live connection: the same port towards the other VIP cannot be told apart at web-0.
    // At the socket (mode all) the kernel refuses the second connect (the tuple to web-0 is
    // in use); per packet (host-only) its SYN is dropped, counted as ct_reply_clash. Either
    // way the live connection keeps working.
    let before = c.stats(0);
    let port = 31100;
    let (live, second) = c.in_client(move || {
        let mut live = connect_from(port, web_dst)?;
        ask_line(&mut live, "first")?;
        let second = ask_from(port, keep_dst, Close::Reset);
        let again = ask_line(&mut live, "again")?;
        Ok((again, second.map_err(|e| format!("{e:#}"))))
    });
    let after = c.stats(0);
    let clashes = after.get("ct_reply_clash").copied().unwrap_or(0)
        - before.get("ct_reply_clash").copied().unwrap_or(0);
    c.step(&format!(
        "port in use towards the other VIP: {second:?}; ct_reply_clash drops {clashes}; the \
         live connection answered by {live}"
    ));
    assert_eq!(live, "web-0", "the live connection broke{}", c.diag());
    assert!(
        second
            .as_ref()
            .is_err_and(|e| e.starts_with("connect from port")),
        "the second connection got through, or failed before connecting: {second:?}"
    );
    if k8s::socket_lb() == "host-only" {
        assert!(clashes >= 1, "no ct_reply_clash drop counted{}", c.diag());
    }
    c.finish();
}

/// Sends `n` TCP SYNs to `dst` from spoofed sources (198.18.200.0 and up, ports 20000-21023):
/// raw IPv4 with the header included. Bounded by `n` and by `limit`. Returns how many went.
fn spoofed_syns(
    dst: std::net::Ipv4Addr,
    port: u16,
    n: u32,
    limit: Duration,
) -> anyhow::Result<u32> {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::RAW,
        Some(socket2::Protocol::from(nix::libc::IPPROTO_RAW)),
    )
    .context("raw socket")?;
    let to: SocketAddr = (dst, 0).into();
    let started = Instant::now();
    let mut sent = 0;
    for i in 0..n {
        if started.elapsed() > limit {
            break;
        }
        let src = std::net::Ipv4Addr::from(0xc612_c800 + (i >> 10));
        let sport = 20000 + (i & 0x3ff) as u16;
        let builder = etherparse::PacketBuilder::ipv4(src.octets(), dst.octets(), 64)
            .tcp(sport, port, i, 64240)
            .syn();
        let mut packet = Vec::with_capacity(builder.size(0));
        builder.write(&mut packet, &[]).context("building a SYN")?;
        socket
            .send_to(&packet, &to.into())
            .context("sending a SYN")?;
        sent += 1;
    }
    Ok(sent)
}

#[test]
fn a_spoofed_syn_flood_breaks_no_established_connection() {
    let mut c = Cluster::new(&[(0, "client"), (0, "web-0"), (1, "web-1"), (0, "web-2")]);
    let vip = vip4(64);
    let svc = service("web", vip);
    let pods = ["web-0", "web-1", "web-2"];
    c.write("web.yaml", &[svc.to_yaml(), c.slice(&svc, &pods)]);
    for p in pods {
        c.serve(p);
    }
    // Small tables: 1,024 answered entries (the 50 connections need 100), 256 unanswered.
    c.start_agents_sized(&[
        ("--max-service-entries", 4096),
        ("--max-backends", 4096),
        ("--max-conntrack-entries", 1024),
        ("--max-ct-new-entries", 256),
    ]);
    let dst = SocketAddr::new(vip, SERVICE_PORT);
    let mut sessions = c.in_client(move || {
        (0..CONNECTIONS)
            .map(|i| {
                let mut s = TcpSession::connect(dst, IO_TIMEOUT)?;
                let label = s.ask(&format!("before-{i}"))?.label;
                Ok((s, label))
            })
            .collect::<anyhow::Result<Vec<_>>>()
    });
    let before = c.stats(0);
    let IpAddr::V4(vip4_addr) = vip else {
        unreachable!("an IPv4 VIP")
    };
    let started = Instant::now();
    let sent =
        c.in_client(move || spoofed_syns(vip4_addr, SERVICE_PORT, FLOOD, Duration::from_secs(10)));
    c.step(&format!(
        "{CONNECTIONS} connections open; {sent} spoofed SYNs sent in {:.2} s",
        started.elapsed().as_secs_f64()
    ));
    assert_eq!(sent, FLOOD, "the flood was cut short");
    let mut broken = Vec::new();
    for (i, (session, label)) in sessions.iter_mut().enumerate() {
        match session.ask(&format!("after-{i}")) {
            Ok(a) if a.label == *label => {}
            Ok(a) => broken.push(format!("{i}: moved from {label} to {}", a.label)),
            Err(e) => broken.push(format!("{i} (on {label}): {e:#}")),
        }
    }
    let after = c.stats(0);
    let delta = |k: &str| after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);
    c.step(&format!(
        "after the flood: {} of {CONNECTIONS} connections broken; dnat +{}, ct_miss_midflow +{}",
        broken.len(),
        delta("dnat"),
        delta("ct_miss_midflow"),
    ));
    assert!(
        broken.is_empty(),
        "the flood broke {} established connections: {broken:?}{}",
        broken.len(),
        c.diag()
    );
    // Both tables, as `inspect ct` shows them: the answered connections (host-only: two
    // entries each) and what the flood left of itself in the small table of unanswered ones.
    let ct = c
        .agent(0)
        .inspect("ct")
        .unwrap_or_else(|e| panic!("inspect ct: {e:#}"));
    // The count line names both tables with their entries and capacity.
    let counts = ct.lines().last().unwrap_or_default();
    c.step(&format!("inspect ct: {counts}"));
    assert!(
        counts.starts_with("CT_V1: ")
            && counts.contains(" entries (answered flows); CT_NEW_V1: ")
            && counts.contains(" entries (flows nothing answered yet)"),
        "inspect ct shows {counts:?}"
    );
    drop(sessions);
    c.finish();
}
