//! Packet edge cases end to end (issue 9), through the real agent on two emulated nodes:
//!
//! - a `ClusterIP`'s ports the Service does not have are refused at once (TCP reset, ICMP port
//!   unreachable, or `ECONNREFUSED` at the socket), also a port just removed from the Service;
//! - a 3,000-byte UDP query and a 3,000-byte answer (EDNS-sized) cross the VIP whole: the veths
//!   have MTU 1500, so both are sent as IP fragments;
//! - rejects arrive with checksums the client pod verifies, also when the node finishes the
//!   checksum in software (transmit checksum offload off on the pod's node-side veth, so a
//!   `CHECKSUM_PARTIAL` reject goes through `skb_checksum_help`).
//!
//! Each runs in both `--socket-lb` modes (`SVC_TEST_SOCKET_LB`): `host-only` is where the TC
//! programs see the pod's packets; with `all` the pod's sockets are translated at `connect()` /
//! `sendto()` and the same outcome is expected. Every socket operation has a timeout; every
//! topology is removed at the end (asserted). Needs root and a built agent.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use svc_tests::{
    k8s::{self, Backends, EndpointSlice, Protocol, Service, frontend_key},
    netns::Netns,
    testbed::{TestBed, vip4, vip6},
};

/// Bound on an operation expected to succeed.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on an operation expected to be refused: a refusal takes microseconds, a black hole
/// times out.
const REFUSE_TIMEOUT: Duration = Duration::from_millis(500);
/// How long the agents may take to apply a change of the directory.
const SYNC_TIMEOUT: Duration = Duration::from_secs(5);
/// The Services' port and the backends'.
const SERVICE_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
/// Size of the big query and of the big answer: more than a 1500-byte MTU carries.
const BIG: usize = 3000;

/// `svc` followed by one ready slice per family of its VIPs listing `pods`.
fn service_docs(bed: &TestBed, svc: &Service, pods: &[&str]) -> Vec<String> {
    let mut docs = vec![svc.to_yaml()];
    for ip in &svc.cluster_ips {
        docs.push(
            EndpointSlice::new(&svc.name, ip.is_ipv6())
                .ports_of(svc, &[])
                .ready_pods(&bed.topo, pods.iter().map(|p| bed.pod(p)))
                .to_yaml(),
        );
    }
    docs
}

fn write(bed: &TestBed, file: &str, docs: &[String]) {
    bed.manifests
        .write(file, &k8s::documents(docs))
        .unwrap_or_else(|e| panic!("writing {file}: {e:#}"));
}

/// Waits until every agent synced after `before` and node1's programmed state satisfies
/// `done` (bounded).
fn wait_synced(bed: &mut TestBed, before: &[usize], done: impl Fn(&k8s::Programmed) -> bool) {
    for (agent, before) in bed.agents.iter_mut().zip(before) {
        agent
            .wait_syncs(before + 1, SYNC_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e:#}"));
    }
    let deadline = Instant::now() + SYNC_TIMEOUT;
    while !done(&bed.programmed(0)) {
        assert!(
            Instant::now() < deadline,
            "node1 did not sync{}",
            bed.diag()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How one attempt that should be refused went.
fn refusal(outcome: anyhow::Result<k8s::Answer>, took: Duration) -> anyhow::Result<Duration> {
    match outcome {
        Ok(a) => bail!("answered by {} instead of refused", a.label),
        Err(e) => {
            let kind = e
                .chain()
                .find_map(|c| c.downcast_ref::<std::io::Error>())
                .map(std::io::Error::kind);
            ensure!(
                kind == Some(std::io::ErrorKind::ConnectionRefused),
                "not refused but {kind:?} after {} ms: {e:#}",
                took.as_millis()
            );
            Ok(took)
        }
    }
}

/// One TCP connection and one connected UDP request from the client pod to `dst`, both of
/// which must be refused at once. Returns the slower of the two.
fn expect_refused(bed: &TestBed, dst: SocketAddr, protos: &[Protocol]) -> Duration {
    let protos = protos.to_vec();
    bed.pod("client")
        .ns
        .run(move || {
            let mut slowest = Duration::ZERO;
            for proto in protos {
                let t = Instant::now();
                let outcome = match proto {
                    Protocol::Udp => {
                        k8s::udp_request_connected(dst, "doomed", REFUSE_TIMEOUT, 1).map(|a| a.0)
                    }
                    _ => k8s::tcp_request(dst, "doomed", REFUSE_TIMEOUT),
                };
                let took = refusal(outcome, t.elapsed())
                    .with_context(|| format!("{} to {dst}", proto.as_k8s()))?;
                slowest = slowest.max(took);
            }
            Ok(slowest)
        })
        .unwrap_or_else(|e| panic!("{e:#}{}", bed.diag()))
}

fn delta(after: &BTreeMap<String, u64>, before: &BTreeMap<String, u64>, key: &str) -> u64 {
    after.get(key).copied().unwrap_or_default() - before.get(key).copied().unwrap_or_default()
}

#[test]
fn unlisted_ports_of_a_cluster_ip_are_refused_at_once() {
    let mut bed = TestBed::new(&[(0, "client"), (1, "web-0")]);
    let (v4, v6) = (vip4(70), vip6(70));
    let both = Service::cluster_ip("web", &[v4, v6])
        .port("tcp", Protocol::Tcp, SERVICE_PORT, BACKEND_PORT)
        .port("udp", Protocol::Udp, SERVICE_PORT, BACKEND_PORT);
    let tcp_only = Service::cluster_ip("web", &[v4, v6]).port(
        "tcp",
        Protocol::Tcp,
        SERVICE_PORT,
        BACKEND_PORT,
    );
    write(&bed, "web.yaml", &service_docs(&bed, &both, &["web-0"]));
    let backends = Backends::new();
    let web = bed.pod("web-0").clone();
    for ip in [IpAddr::from(web.ipv4), web.ipv6.into()] {
        backends
            .serve(&web.ns, "web-0", SocketAddr::new(ip, BACKEND_PORT))
            .unwrap_or_else(|e| panic!("{e:#}"));
    }
    bed.start_agents();
    let before = bed.stats(0);
    for vip in [v4, v6] {
        let listed = SocketAddr::new(vip, SERVICE_PORT);
        bed.pod("client")
            .ns
            .run(move || {
                k8s::tcp_request(listed, "hello", IO_TIMEOUT)?;
                k8s::udp_request(listed, "hello", IO_TIMEOUT, 2).map(drop)
            })
            .unwrap_or_else(|e| panic!("{e:#}{}", bed.diag()));
        for port in [81, 443] {
            let took = expect_refused(
                &bed,
                SocketAddr::new(vip, port),
                &[Protocol::Tcp, Protocol::Udp],
            );
            bed.step(&format!(
                "{vip} port {port} (not a port of web): TCP and UDP refused, slowest {} ms",
                took.as_millis()
            ));
        }
    }

    // The UDP port goes away: it is refused from then on, not black-holed.
    let syncs: Vec<usize> = bed.agents.iter().map(k8s::Agent::syncs).collect();
    write(&bed, "web.yaml", &service_docs(&bed, &tcp_only, &["web-0"]));
    let udp_key = frontend_key(SocketAddr::new(v4, SERVICE_PORT), Protocol::Udp);
    wait_synced(&mut bed, &syncs, |p| !p.frontends.contains_key(&udp_key));
    for vip in [v4, v6] {
        let took = expect_refused(&bed, SocketAddr::new(vip, SERVICE_PORT), &[Protocol::Udp]);
        bed.step(&format!(
            "UDP port {SERVICE_PORT} removed from web: {vip} refuses it in {} ms",
            took.as_millis()
        ));
    }
    let after = bed.stats(0);
    let unlisted = delta(&after, &before, "unlisted_port");
    bed.step(&format!(
        "node1: unlisted_port +{unlisted}, rejected +{}",
        delta(&after, &before, "rejected")
    ));
    // 2 families x 2 ports x (TCP + UDP) + 2 families x the removed UDP port.
    assert!(unlisted >= 10, "unlisted_port +{unlisted}{}", bed.diag());
    assert_eq!(
        delta(&after, &before, "unlisted_port_dropped"),
        0,
        "{}",
        bed.diag()
    );
    drop(backends);
    bed.finish();
}

/// A UDP server answering each datagram with `"<label> <client> <bytes received>"` padded
/// to [`BIG`] bytes. Stops (and closes its socket) when dropped.
struct BigUdpServer {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl BigUdpServer {
    fn start(ns: &Netns, label: &str, addr: SocketAddr) -> anyhow::Result<Self> {
        let socket = ns.run(|| UdpSocket::bind(addr).with_context(|| format!("bind {addr}")))?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let (stop, served) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let (s, n, label) = (Arc::clone(&stop), Arc::clone(&served), label.to_owned());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !s.load(Ordering::Relaxed) {
                let Ok((len, peer)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let mut answer = format!("{label} {} {len} ", peer.ip()).into_bytes();
                answer.resize(BIG, b'x');
                if socket.send_to(&answer, peer).is_ok() {
                    n.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Ok(Self {
            stop,
            served,
            thread: Some(thread),
        })
    }
}

impl Drop for BigUdpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One [`BIG`]-byte query from the client pod to `dst` (up to 3 tries, same socket); returns
/// the answer's text head, its length and where it came from.
fn big_exchange(bed: &TestBed, dst: SocketAddr) -> anyhow::Result<(String, usize, SocketAddr)> {
    bed.pod("client").ns.run(move || {
        let bind: SocketAddr = if dst.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = k8s::udp_socket(bind)?;
        socket.set_read_timeout(Some(Duration::from_millis(700)))?;
        let query = vec![b'q'; BIG];
        let mut buf = vec![0u8; 65536];
        let mut last = anyhow::anyhow!("no attempt");
        for _ in 0..3 {
            socket.send_to(&query, dst).context("send")?;
            match socket.recv_from(&mut buf) {
                Ok((n, from)) => {
                    let head = String::from_utf8_lossy(&buf[..n.min(80)])
                        .trim_end_matches('x')
                        .to_owned();
                    return Ok((head, n, from));
                }
                Err(e) => last = anyhow::Error::from(e).context("no answer"),
            }
        }
        Err(last)
    })
}

#[test]
fn big_udp_queries_and_answers_cross_the_vip_whole_as_fragments() {
    let mut bed = TestBed::new(&[(0, "client"), (1, "dns-0")]);
    let (v4, v6) = (vip4(71), vip6(71));
    let svc = Service::cluster_ip("dns", &[v4, v6]).port(
        "dns",
        Protocol::Udp,
        SERVICE_PORT,
        BACKEND_PORT,
    );
    write(&bed, "dns.yaml", &service_docs(&bed, &svc, &["dns-0"]));
    let dns = bed.pod("dns-0").clone();
    let servers: Vec<BigUdpServer> = [IpAddr::from(dns.ipv4), dns.ipv6.into()]
        .into_iter()
        .map(|ip| {
            BigUdpServer::start(&dns.ns, "dns-0", SocketAddr::new(ip, BACKEND_PORT))
                .unwrap_or_else(|e| panic!("{e:#}"))
        })
        .collect();
    bed.start_agents();
    let before = bed.stats(0);
    for vip in [v4, v6] {
        let dst = SocketAddr::new(vip, SERVICE_PORT);
        let client = bed.pod_ip("client", vip);
        let (head, len, from) =
            big_exchange(&bed, dst).unwrap_or_else(|e| panic!("{dst}: {e:#}{}", bed.diag()));
        bed.step(&format!(
            "{dst}: a {BIG}-byte query, a {len}-byte answer from {from}: {head:?}"
        ));
        assert_eq!(from, dst, "the answer must come from the service");
        assert_eq!(len, BIG, "the answer must arrive whole");
        assert_eq!(
            head,
            format!("dns-0 {client} {BIG} "),
            "the backend must get the whole query from the client's own address"
        );
    }
    let after = bed.stats(0);
    bed.step(&format!(
        "node1: fragment +{}, frag_untracked +{}, dnat +{}, rev_nat +{}",
        delta(&after, &before, "fragment"),
        delta(&after, &before, "frag_untracked"),
        delta(&after, &before, "dnat"),
        delta(&after, &before, "rev_nat")
    ));
    let served: u64 = servers
        .iter()
        .map(|s| s.served.load(Ordering::Relaxed))
        .sum();
    assert_eq!(served, 2, "each query answered once");
    drop(servers);
    bed.finish();
}

/// `ETHTOOL_STXCSUM` (linux/ethtool.h): set transmit checksum offload.
const ETHTOOL_STXCSUM: u32 = 0x17;
/// `SIOCETHTOOL` (linux/sockios.h).
const SIOCETHTOOL: u64 = 0x8946;

/// `struct ethtool_value`.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// Turns transmit checksum offload of `ifname` (in the current namespace) off: a
/// `CHECKSUM_PARTIAL` packet sent through it has its checksum finished in software.
fn tx_checksum_off(ifname: &str) -> anyhow::Result<()> {
    let socket = UdpSocket::bind("0.0.0.0:0").context("a socket for the ioctl")?;
    let mut value = EthtoolValue {
        cmd: ETHTOOL_STXCSUM,
        data: 0,
    };
    // SAFETY: an all-zero `ifreq` is valid; the name fits (checked) and stays NUL-terminated.
    let mut req: nix::libc::ifreq = unsafe { std::mem::zeroed() };
    ensure!(ifname.len() < req.ifr_name.len(), "{ifname}: name too long");
    for (d, s) in req.ifr_name.iter_mut().zip(ifname.bytes()) {
        *d = s.cast_signed();
    }
    req.ifr_ifru.ifru_data = (&raw mut value).cast();
    // SAFETY: SIOCETHTOOL reads the `ifreq` and the `ethtool_value` it points at, both alive.
    let rc = unsafe { nix::libc::ioctl(socket.as_raw_fd(), SIOCETHTOOL as _, &raw mut req) };
    ensure!(
        rc == 0,
        "SIOCETHTOOL ETHTOOL_STXCSUM off on {ifname}: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// The sum of every `InCsumErrors` counter (TCP, UDP, ICMP, both families) of the current
/// namespace.
fn checksum_errors() -> anyhow::Result<u64> {
    let mut total = 0;
    let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp")?;
    let lines: Vec<&str> = snmp.lines().collect();
    for pair in lines.chunks(2) {
        if let [names, values] = pair {
            for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
                if n == "InCsumErrors" {
                    total += v.parse::<u64>().unwrap_or(0);
                }
            }
        }
    }
    let snmp6 = std::fs::read_to_string("/proc/thread-self/net/snmp6")?;
    for line in snmp6.lines() {
        if let [n, v] = line.split_whitespace().collect::<Vec<_>>().as_slice()
            && n.ends_with("InCsumErrors")
        {
            total += v.parse::<u64>().unwrap_or(0);
        }
    }
    Ok(total)
}

#[test]
fn rejects_arrive_with_checksums_the_client_verifies() {
    let mut bed = TestBed::new(&[(0, "client")]);
    let (v4, v6) = (vip4(72), vip6(72));
    // No endpoints at all: every request is rejected.
    let svc = Service::cluster_ip("empty", &[v4, v6])
        .port("tcp", Protocol::Tcp, SERVICE_PORT, BACKEND_PORT)
        .port("udp", Protocol::Udp, SERVICE_PORT, BACKEND_PORT);
    write(&bed, "empty.yaml", &service_docs(&bed, &svc, &[]));
    let client = bed.pod("client").clone();
    let node = bed.topo.node(client.node).clone();
    node.ns
        .run(|| tx_checksum_off(&client.host_ifname))
        .unwrap_or_else(|e| panic!("{e:#}"));
    bed.step(&format!(
        "transmit checksum offload off on {} (the client's node-side veth)",
        client.host_ifname
    ));
    bed.start_agents();
    let errors_before = client.ns.run(checksum_errors).expect("snmp counters");
    for vip in [v4, v6] {
        for port in [SERVICE_PORT, 81] {
            let dst = SocketAddr::new(vip, port);
            let took = expect_refused(&bed, dst, &[Protocol::Tcp, Protocol::Udp]);
            bed.step(&format!(
                "{dst}: TCP and UDP refused in at most {} ms",
                took.as_millis()
            ));
        }
    }
    let errors = client.ns.run(checksum_errors).expect("snmp counters") - errors_before;
    bed.step(&format!("client: InCsumErrors +{errors}"));
    assert_eq!(errors, 0, "the client dropped rejects with bad checksums");
    bed.finish();
}
