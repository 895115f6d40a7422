//! What the connect-time path must do for pods, in both configurations the suite runs
//! (`SVC_TEST_SOCKET_LB`: `all`, pods translated at the socket as shipped; `host-only`, pods
//! translated per packet by the TC programs). Each case holds in both, and checks where the
//! translation happened (`sock_xlate` at the socket, `dnat` per packet), so a path that
//! quietly fell back to the other one fails.
//!
//! - **A UDP socket keeps its backend per service**: one unconnected socket (a resolver's)
//!   sending many datagrams to a service with three endpoints is answered by one endpoint
//!   throughout (per packet the flow's conntrack entry does it; at the socket,
//!   `SOCK_UDP_PIN_V1`); a second socket chooses on its own; when the endpoint is removed, the
//!   socket's very next datagram is answered by a live one, and it sticks to that one.
//! - **Dual-stack sockets reach IPv4 services** through IPv4-mapped addresses
//!   (`::ffff:198.19.0.x`, as Java and Go dual-stack sockets do): TCP, connected and
//!   unconnected UDP; the socket reports the mapped service address as its peer.
//!
//! Needs root and the agent binary (`cargo build -p svc-agent`): fails, never skips, without
//! them.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use svc_tests::{
    k8s::{self, Backends, EndpointSlice, Protocol, Service, UdpSession},
    netns::sockd,
    testbed::{TestBed, vip4, vip6},
};

/// Bound on every connect, read and write.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// A UDP request is sent at most this many times ...
const UDP_ATTEMPTS: u32 = 3;
/// ... waiting this long for each answer.
const UDP_WAIT: Duration = Duration::from_millis(700);
/// How long the agents may take to apply a change of the directory.
const SYNC_TIMEOUT: Duration = Duration::from_secs(5);
const SERVICE_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
/// Datagrams per socket.
const DATAGRAMS: usize = 20;

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

    /// `svc` with one ready slice per family listing `pods`, written to `svc.yaml`.
    fn write(&self, svc: &Service, pods: &[&str]) {
        let mut docs = vec![svc.to_yaml()];
        for ip in &svc.cluster_ips {
            docs.push(
                EndpointSlice::new(&svc.name, ip.is_ipv6())
                    .ports_of(svc, &[])
                    .ready_pods(&self.bed.topo, pods.iter().map(|p| self.pod(p)))
                    .to_yaml(),
            );
        }
        self.bed
            .manifests
            .write("svc.yaml", &k8s::documents(&docs))
            .unwrap_or_else(|e| panic!("writing svc.yaml: {e:#}"));
    }

    /// Rewrites the service with `pods` and waits until every agent synced it.
    fn edit(&mut self, what: &str, svc: &Service, pods: &[&str]) {
        let before: Vec<usize> = self.bed.agents.iter().map(k8s::Agent::syncs).collect();
        let t = Instant::now();
        self.write(svc, pods);
        for (agent, before) in self.bed.agents.iter_mut().zip(before) {
            agent
                .wait_syncs(before + 1, SYNC_TIMEOUT)
                .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        }
        self.step(&format!(
            "{what}: agents synced after {:.0} ms",
            t.elapsed().as_secs_f64() * 1e3
        ));
    }

    /// Serves TCP and UDP on [`BACKEND_PORT`] of both of `pod`'s addresses.
    fn serve(&self, pod: &str) {
        let p = self.pod(pod);
        for ip in [IpAddr::from(p.ipv4), p.ipv6.into()] {
            self.backends
                .serve(&p.ns, pod, SocketAddr::new(ip, BACKEND_PORT))
                .unwrap_or_else(|e| panic!("serving {pod} on {ip}: {e:#}"));
        }
    }

    fn finish(self) {
        let Self { backends, bed } = self;
        drop(backends);
        bed.finish();
    }
}

fn delta(after: &BTreeMap<String, u64>, before: &BTreeMap<String, u64>, key: &str) -> u64 {
    after.get(key).copied().unwrap_or_default() - before.get(key).copied().unwrap_or_default()
}

/// Asserts that node1 translated at least `n` connections or datagrams between `before` and
/// `after`, where this run translates pods (at the socket, or per packet), and none the other
/// way.
fn translated_where_expected(
    c: &Cluster,
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
    n: u64,
) {
    let (here, not_there) = if k8s::pods_at_socket() {
        ("sock_xlate", "dnat")
    } else {
        ("dnat", "sock_xlate")
    };
    assert!(
        delta(after, before, here) >= n,
        "node1 {here} +{}, want >= {n}{}",
        delta(after, before, here),
        c.diag()
    );
    assert_eq!(
        delta(after, before, not_there),
        0,
        "node1 {not_there} moved: pods were translated the other way{}",
        c.diag()
    );
}

/// `n` requests on one open UDP socket; returns who answered each.
fn session_answers(session: &UdpSession, tag: &str, n: usize) -> anyhow::Result<Vec<String>> {
    (0..n)
        .map(|i| {
            let (a, _) = session.ask(&format!("{tag}-{i}"), UDP_ATTEMPTS)?;
            Ok(a.label)
        })
        .collect()
}

#[test]
fn a_udp_socket_keeps_its_backend_until_the_backend_ends() {
    let mut c = Cluster::new(&[(0, "client"), (0, "web-0"), (1, "web-1"), (1, "web-2")]);
    let svc = Service::cluster_ip("dns", &[vip4(110), vip6(110)]).port(
        "dns",
        Protocol::Udp,
        SERVICE_PORT,
        BACKEND_PORT,
    );
    let web = ["web-0", "web-1", "web-2"];
    c.write(&svc, &web);
    for name in web {
        c.serve(name);
    }
    c.bed.start_agents();
    c.step(&format!(
        "pods translated {}",
        if k8s::pods_at_socket() {
            "at the socket (--socket-lb all)"
        } else {
            "per packet (--socket-lb host-only)"
        }
    ));

    for &vip in &svc.cluster_ips {
        let dst = SocketAddr::new(vip, SERVICE_PORT);
        let before = c.stats(0);
        let client = c.pod("client").ns.clone();
        let (first, second, sessions) = client
            .run(move || {
                let a = UdpSession::open(dst, UDP_WAIT)?;
                let b = UdpSession::open(dst, UDP_WAIT)?;
                let first = session_answers(&a, "a", DATAGRAMS)?;
                let second = session_answers(&b, "b", DATAGRAMS)?;
                Ok((first, second, (a, b)))
            })
            .unwrap_or_else(|e| panic!("{e:#}{}", c.diag()));
        for (name, answers) in [("first", &first), ("second", &second)] {
            assert!(
                answers.iter().all(|l| *l == answers[0]),
                "{dst}: the {name} socket's {DATAGRAMS} datagrams were answered by {answers:?}: \
                 want one backend throughout{}",
                c.diag()
            );
        }
        let after = c.stats(0);
        // Per packet each datagram is translated; at the socket each sendto is.
        translated_where_expected(&c, &before, &after, 2 * DATAGRAMS as u64);
        c.step(&format!(
            "{dst}: socket a -> {} for all {DATAGRAMS} datagrams, socket b -> {}",
            first[0], second[0]
        ));

        // The first socket's backend ends: its next datagram must reach a live one at once.
        let gone = first[0].clone();
        let rest: Vec<&str> = web.iter().copied().filter(|w| *w != gone).collect();
        c.edit(&format!("{gone} removed"), &svc, &rest);
        let (a, _b) = sessions;
        let (answer, attempt) = a
            .ask("moved", UDP_ATTEMPTS)
            .unwrap_or_else(|e| panic!("after {gone} left: {e:#}{}", c.diag()));
        let (moved, resent) = (answer.label, attempt - 1);
        assert!(
            moved != gone && resent == 0,
            "{dst}: after {gone} left, the socket's next datagram was answered by {moved} after \
             {resent} re-sends; want a live endpoint at once{}",
            c.diag()
        );
        let again = session_answers(&a, "again", 5).unwrap_or_else(|e| panic!("{e:#}"));
        assert!(
            again.iter().all(|l| *l == moved),
            "{dst}: after moving to {moved}, the socket was answered by {again:?}{}",
            c.diag()
        );
        c.step(&format!(
            "{dst}: {gone} removed; the socket moved to {moved} on its next datagram and stayed"
        ));
        c.edit(&format!("{gone} back"), &svc, &web);
    }
    c.finish();
}

#[test]
fn dual_stack_sockets_reach_ipv4_services_through_mapped_addresses() {
    let mut c = Cluster::new(&[(0, "client"), (0, "web-0"), (1, "web-1")]);
    let svc = Service::cluster_ip("mapped", &[vip4(111)])
        .port("tcp", Protocol::Tcp, SERVICE_PORT, BACKEND_PORT)
        .port("udp", Protocol::Udp, SERVICE_PORT, BACKEND_PORT);
    let web = ["web-0", "web-1"];
    c.write(&svc, &web);
    for name in web {
        c.serve(name);
    }
    c.bed.start_agents();
    let IpAddr::V4(v4) = vip4(111) else {
        unreachable!("vip4 is IPv4")
    };
    let mapped = SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), SERVICE_PORT);
    let client_ip = IpAddr::V4(c.pod("client").ipv4);
    let before = c.stats(0);
    let client = c.pod("client").ns.clone();
    let labels = client
        .run(move || {
            let mut labels = Vec::new();
            for i in 0..5 {
                // TCP on a dual-stack socket.
                let s = dual_stack(socket2::Type::STREAM)?;
                s.connect_timeout(&mapped.into(), IO_TIMEOUT)
                    .with_context(|| format!("TCP connect to {mapped}"))?;
                let mut stream = std::net::TcpStream::from(s);
                stream.set_read_timeout(Some(IO_TIMEOUT))?;
                let peer = stream.peer_addr()?;
                ensure!(peer == mapped, "TCP peer {peer}, want {mapped}");
                labels.push(ask_tcp(&mut stream, &format!("tcp-{i}"), client_ip)?);
                // UDP, unconnected then connected.
                for connected in [false, true] {
                    let s = dual_stack(socket2::Type::DGRAM)?;
                    s.bind(&SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0).into())?;
                    let udp = std::net::UdpSocket::from(s);
                    udp.set_read_timeout(Some(UDP_WAIT))?;
                    if connected {
                        udp.connect(mapped)?;
                        ensure!(udp.peer_addr()? == mapped, "UDP peer {}", udp.peer_addr()?);
                    }
                    let request = format!("udp-{i}-{connected}");
                    udp.send_to(request.as_bytes(), mapped)?;
                    let mut buf = [0u8; 512];
                    let (n, from) = udp
                        .recv_from(&mut buf)
                        .with_context(|| format!("no UDP answer to {request} from {mapped}"))?;
                    ensure!(from == mapped, "UDP answer from {from}, want {mapped}");
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    labels.push(check_answer(&text, &request, client_ip)?);
                }
            }
            Ok(labels)
        })
        .unwrap_or_else(|e| panic!("{e:#}{}", c.diag()));
    let after = c.stats(0);
    translated_where_expected(&c, &before, &after, 15);
    c.step(&format!(
        "{mapped}: 5 TCP connections and 10 UDP exchanges from dual-stack sockets answered by \
         {labels:?}; peers and senders shown as {mapped}"
    ));
    assert!(
        labels.iter().all(|l| web.contains(&l.as_str())),
        "{labels:?}"
    );
    c.finish();
}

/// An IPv6 socket that also reaches IPv4 (`IPV6_V6ONLY` off), made in the current namespace
/// (a pod's through its socket helper).
fn dual_stack(kind: socket2::Type) -> anyhow::Result<socket2::Socket> {
    let s = sockd::socket(socket2::Domain::IPV6, kind)?;
    s.set_only_v6(false)?;
    Ok(s)
}

/// Sends `request` over `stream` and reads the answer line: `"<label> <client> <request>"`.
fn ask_tcp(
    stream: &mut std::net::TcpStream,
    request: &str,
    client: IpAddr,
) -> anyhow::Result<String> {
    use std::io::{BufRead as _, BufReader, Write as _};
    stream.write_all(format!("{request}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    check_answer(&line, request, client)
}

/// Checks an answer (`"<label> <client> <request>"`) echoes `request` and saw `client` (as
/// an IPv4 address, or mapped); returns the label.
fn check_answer(text: &str, request: &str, client: IpAddr) -> anyhow::Result<String> {
    let mut words = text.split_whitespace();
    let (Some(label), Some(seen), Some(echo)) = (words.next(), words.next(), words.next()) else {
        anyhow::bail!("malformed answer {text:?}");
    };
    ensure!(echo == request, "answer {text:?} to {request:?}");
    let seen: IpAddr = seen.parse().context("client address in the answer")?;
    let seen = match seen {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(seen, IpAddr::V4),
        v4 @ IpAddr::V4(_) => v4,
    };
    ensure!(
        seen == client,
        "{label} saw the client as {seen}, not {client}"
    );
    Ok(label.to_owned())
}
