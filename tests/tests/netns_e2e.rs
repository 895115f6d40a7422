//! End-to-end proof of the network-namespace harness: two emulated nodes, one pod on each, the
//! `svc_tc_from_pod` program attached (one loaded object per node, like two agents) on each
//! node's pod-facing interface, and real TCP and UDP exchanges between the pods over IPv4 and
//! IPv6. The program's counters show it was on the path; afterwards nothing of the run remains.
//!
//! Needs root (namespaces, bpffs, cgroups, eBPF): fails, never skips, without it.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::unix::process::ExitStatusExt as _,
    panic::AssertUnwindSafe,
    path::PathBuf,
    process::Command,
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use aya::{
    Ebpf,
    maps::PerCpuArray,
    programs::{SchedClassifier, TcAttachType, tc},
};
use svc_agent::loader::{PROG_TC_FROM_POD, load_object};
use svc_common::stats::{Counter, PktCounter};
use svc_tests::netns::{self, Netns, Node, Pod, Topology};

/// Bound on every connect, read, write and accept.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// UDP requests are re-sent at most this many times (the first normally answers).
const UDP_ATTEMPTS: u32 = 3;
/// The per-CPU counter map every program writes.
const STATS_MAP: &str = "PKT_STATS_V1";

/// Packets per [`PktCounter`], summed over CPUs.
type Stats = [u64; PktCounter::COUNT as usize];

/// What the panicking closure leaves for the checks after it.
struct Seen {
    prefix: String,
    node_dirs: Vec<(PathBuf, PathBuf)>,
    pids: Vec<u32>,
}

/// Each node's (bpffs, cgroup) directories.
fn node_dirs(topo: &Topology) -> Vec<(PathBuf, PathBuf)> {
    topo.nodes()
        .iter()
        .map(|n| (n.bpffs.clone(), n.cgroup.clone()))
        .collect()
}

fn must_be_root() {
    if let Err(e) = netns::require_root() {
        panic!("{e:#}");
    }
}

#[test]
fn pod_to_pod_tcp_and_udp_over_v4_and_v6_pass_the_tc_program_on_both_nodes() {
    must_be_root();
    let started = Instant::now();
    let step = |what: &str| println!("[{:>6.2}s] {what}", started.elapsed().as_secs_f64());

    let mut topo = Topology::new().expect("building the topology");
    let pod1 = topo.add_pod(0, "client").expect("adding the pod on node1");
    let pod2 = topo.add_pod(1, "server").expect("adding the pod on node2");
    step(&format!(
        "topology {} up: {} {}/{} on {}, {} {}/{} on {}",
        topo.prefix(),
        pod1.name,
        pod1.ipv4,
        pod1.ipv6,
        topo.node(0).name,
        pod2.name,
        pod2.ipv4,
        pod2.ipv6,
        topo.node(1).name
    ));
    let prefix = topo.prefix().to_owned();
    let node_dirs = node_dirs(&topo);
    for (bpffs, cgroup) in &node_dirs {
        assert!(
            netns::is_mounted(bpffs, "bpf"),
            "no bpffs mounted at {}",
            bpffs.display()
        );
        assert!(
            cgroup.join("cgroup.procs").exists(),
            "no cgroup {}",
            cgroup.display()
        );
    }

    // One object per node, like one agent per node: independent programs and maps.
    let ebpfs: Vec<Ebpf> = topo
        .nodes()
        .iter()
        .map(|node| attach_from_pod(node).unwrap_or_else(|e| panic!("{}: {e:#}", node.name)))
        .collect();
    step(&format!(
        "{PROG_TC_FROM_POD} attached to TC ingress of {} on both nodes",
        topo.node(0).pod_ifnames[0]
    ));
    let before: Vec<Stats> = ebpfs.iter().map(|e| read_stats(e).unwrap()).collect();

    for v6 in [false, true] {
        let (client, server) = (End::pod(&pod1, v6), End::pod(&pod2, v6));
        let family = if v6 { "IPv6" } else { "IPv4" };
        tcp_echo(&client, &server).unwrap_or_else(|e| panic!("TCP over {family}: {e:#}"));
        step(&format!(
            "TCP over {family}: {} -> {} echoed",
            client.ip, server.ip
        ));
        let attempts = udp_request_response(&client, &server)
            .unwrap_or_else(|e| panic!("UDP over {family}: {e:#}"));
        step(&format!(
            "UDP over {family}: {} -> {} answered (attempt {attempts})",
            client.ip, server.ip
        ));
    }

    let after: Vec<Stats> = ebpfs.iter().map(|e| read_stats(e).unwrap()).collect();
    let deltas: Vec<Stats> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| std::array::from_fn(|i| a[i] - b[i]))
        .collect();
    print_stats(&topo, &deltas);
    // Lower bounds every exchange guarantees. node1 sees pod1's packets per family: TCP SYN,
    // ACK, data (3+) and a UDP request. node2 sees pod2's: SYN-ACK, the echo (2+) and a UDP
    // response. IPv6 counts also include the pods' neighbour discovery.
    for (node, delta, tcp, l3) in [(0, &deltas[0], 6, 4), (1, &deltas[1], 4, 3)] {
        let name = &topo.node(node).name;
        let got = |c: PktCounter| delta[c as usize];
        assert!(
            got(PktCounter::Tcp) >= tcp,
            "{name}: tcp moved by {}, want >= {tcp}",
            got(PktCounter::Tcp)
        );
        assert!(
            got(PktCounter::Udp) >= 2,
            "{name}: udp moved by {}, want >= 2",
            got(PktCounter::Udp)
        );
        assert!(
            got(PktCounter::Ipv4) >= l3,
            "{name}: ipv4 moved by {}, want >= {l3}",
            got(PktCounter::Ipv4)
        );
        assert!(
            got(PktCounter::Ipv6) >= l3,
            "{name}: ipv6 moved by {}, want >= {l3}",
            got(PktCounter::Ipv6)
        );
    }
    step("counters moved on both nodes");

    drop(ebpfs);
    drop(topo);
    netns::assert_run_gone(&prefix);
    step(&format!("topology dropped: nothing of {prefix} remains"));
}

#[test]
fn guards_remove_everything_when_a_test_panics() {
    must_be_root();
    let seen: Mutex<Option<Seen>> = Mutex::new(None);
    println!("building a topology, starting processes, then panicking on purpose");
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let mut topo = Topology::new().expect("building the topology");
        let pod = topo.add_pod(0, "doomed").expect("adding a pod");
        let node = topo.node(0);
        // A guarded process in node1's namespace and cgroup, one in the pod ...
        let mut in_node = node
            .spawn(Command::new("sleep").arg("600"))
            .expect("spawning in the node");
        let in_pod = pod
            .ns
            .spawn(Command::new("sh").args(["-c", "sleep 600 & wait"]), None)
            .expect("spawning in the pod");
        // ... and an unguarded daemon only the topology's drop can find (by namespace).
        let daemon = pod
            .ns
            .exec(["sh", "-c", "sleep 600 >/dev/null 2>&1 </dev/null & echo $!"])
            .expect("starting a daemon in the pod");
        let daemon: u32 = daemon.trim().parse().expect("daemon pid");
        assert!(
            in_node.try_status().unwrap().is_none(),
            "sleep in node1 died early"
        );
        let procs = std::fs::read_to_string(node.cgroup.join("cgroup.procs")).unwrap();
        assert!(
            procs
                .split_whitespace()
                .any(|p| p == in_node.pid().to_string()),
            "{} is not in {}: {procs:?}",
            in_node.pid(),
            node.cgroup.display()
        );
        assert!(!netns::leftovers(topo.prefix()).unwrap().is_empty());
        *seen.lock().unwrap() = Some(Seen {
            prefix: topo.prefix().to_owned(),
            node_dirs: node_dirs(&topo),
            pids: vec![in_node.pid(), in_pod.pid(), daemon],
        });
        println!("(the next panic is deliberate)");
        panic!("deliberate panic inside a live topology");
    }));
    assert!(outcome.is_err(), "the closure was meant to panic");
    let Seen {
        prefix,
        node_dirs,
        pids,
    } = seen.lock().unwrap().take().expect("the closure ran");
    netns::assert_run_gone(&prefix);
    for (bpffs, cgroup) in &node_dirs {
        assert!(
            !netns::is_mounted(bpffs, "bpf"),
            "bpffs {} still mounted",
            bpffs.display()
        );
        assert!(!cgroup.exists(), "cgroup {} remains", cgroup.display());
    }
    for pid in pids {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(
            !cmdline.starts_with(b"sleep\0"),
            "process {pid} ({}) survived the topology",
            String::from_utf8_lossy(&cmdline)
        );
    }
    println!("after the panic nothing of {prefix} remains, its processes are gone");
}

#[test]
fn spawned_processes_run_in_their_node_and_the_external_client_reaches_pods() {
    must_be_root();
    let mut topo = Topology::new().expect("building the topology");
    let pod2 = topo.add_pod(1, "web").expect("adding a pod on node2");
    let node = topo.node(0);

    // A background process in node1's namespace and cgroup, with an environment variable.
    let mut command = Command::new("sh");
    command
        .args([
            "-c",
            "cat /proc/self/cgroup; ip -o addr show dev eth0; echo ready $SVC_TEST_VAR; exec sleep 600",
        ])
        .env("SVC_TEST_VAR", "xyzzy");
    let mut agent = node.spawn(&command).expect("spawning in node1");
    agent
        .wait_for_output("ready xyzzy", IO_TIMEOUT)
        .expect("the process prints its readiness line");
    let said = agent.output();
    let cgroup_name = node.cgroup.file_name().unwrap().to_string_lossy();
    assert!(
        said.contains(&format!("0::/{cgroup_name}")),
        "not in the node cgroup: {said}"
    );
    assert!(
        said.contains(&format!("{}/24", node.underlay_v4)),
        "not in node1's namespace: {said}"
    );
    let status = agent.stop().expect("stopping the process");
    assert_eq!(status.signal(), Some(15), "SIGTERM ends it: {status}");
    println!(
        "spawned process ran in {} and {}",
        node.ns,
        node.cgroup.display()
    );

    // exec: output on success, stderr in the error.
    let addrs = node
        .ns
        .exec(["ip", "-o", "addr"])
        .expect("ip addr in node1");
    assert!(addrs.contains(&node.underlay_v6.to_string()), "{addrs}");
    let err = node
        .ns
        .exec(["ip", "link", "show", "nonexistent0"])
        .expect_err("showing a missing link fails");
    assert!(format!("{err:#}").contains("nonexistent0"), "{err:#}");

    // run: a socket bound to node1's underlay address exists only in node1's namespace.
    let bound = node.ns.run(|| {
        Ok(UdpSocket::bind(SocketAddr::new(
            node.underlay_v4.into(),
            0,
        ))?)
    });
    assert!(bound.is_ok(), "bind in node1: {bound:?}");
    assert!(
        UdpSocket::bind(SocketAddr::new(node.underlay_v4.into(), 0)).is_err(),
        "the root namespace must not have 198.18.0.11"
    );

    // Traffic nobody translates goes to the black-hole gateway and times out, as on a node
    // with a default route (no "network unreachable" at once), from a pod and from the node.
    for (who, ns) in [("pod", &pod2.ns), ("node1", &node.ns)] {
        for vip in ["198.19.255.250", "2001:db8:f::fa"] {
            let dst = SocketAddr::new(vip.parse().unwrap(), 80);
            let started = Instant::now();
            let got = ns.run(move || {
                Ok(TcpStream::connect_timeout(&dst, Duration::from_millis(300))
                    .map(drop)
                    .map_err(|e| e.kind()))
            });
            assert_eq!(
                got.expect("connecting"),
                Err(ErrorKind::TimedOut),
                "{who} -> {dst}: untranslated traffic must time out (after {:?})",
                started.elapsed()
            );
        }
    }
    println!("untranslated connects to the service range time out (black-hole gateway)");

    // The external client reaches a pod on node2 through node1 (its route for every pod CIDR).
    let external = topo.external();
    for v6 in [false, true] {
        let client = End {
            name: "external",
            ns: &external.ns,
            ip: if v6 {
                external.ipv6.into()
            } else {
                external.ipv4.into()
            },
        };
        let server = End::pod(&pod2, v6);
        tcp_echo(&client, &server)
            .unwrap_or_else(|e| panic!("external -> {} over TCP: {e:#}", server.ip));
        println!("TCP external {} -> {} echoed", client.ip, server.ip);
    }
}

/// Loads a fresh copy of the object, loads `svc_tc_from_pod` and attaches it to TC ingress of
/// the node's first pod-facing interface, from inside the node's namespace. The link lives as
/// long as the returned object.
fn attach_from_pod(node: &Node) -> anyhow::Result<Ebpf> {
    let mut ebpf = load_object(svc_agent::loader::MapSizes::small())?;
    let prog: &mut SchedClassifier = ebpf
        .program_mut(PROG_TC_FROM_POD)
        .with_context(|| format!("no program {PROG_TC_FROM_POD} in the object"))?
        .try_into()?;
    prog.load()
        .with_context(|| format!("loading {PROG_TC_FROM_POD}"))?;
    let iface = node
        .pod_ifnames
        .first()
        .context("the node has no pod-facing interface")?
        .clone();
    node.ns.run(|| {
        // Only the netlink fallback (kernels < 6.6) needs clsact; with TCX it is unused. An
        // error here is "exists" or harmless: a real problem shows in attach.
        let _ = tc::qdisc_add_clsact(&iface);
        prog.attach(&iface, TcAttachType::Ingress)
            .with_context(|| format!("attaching {PROG_TC_FROM_POD} to ingress of {iface}"))?;
        Ok(())
    })?;
    Ok(ebpf)
}

fn read_stats(ebpf: &Ebpf) -> anyhow::Result<Stats> {
    let map = PerCpuArray::<_, Counter>::try_from(
        ebpf.map(STATS_MAP)
            .with_context(|| format!("no map {STATS_MAP}"))?,
    )?;
    let mut stats = [0; PktCounter::COUNT as usize];
    for counter in PktCounter::ALL {
        let per_cpu = map.get(&(counter as u32), 0)?;
        stats[counter as usize] = per_cpu.iter().map(|c| c.packets).sum();
    }
    Ok(stats)
}

fn print_stats(topo: &Topology, deltas: &[Stats]) {
    print!("{:<18}", "packets seen");
    for node in topo.nodes() {
        print!("{:>8}", node.name);
    }
    println!();
    for counter in PktCounter::ALL {
        if deltas.iter().all(|d| d[counter as usize] == 0) {
            continue;
        }
        print!("  {:<16}", counter.name());
        for delta in deltas {
            print!("{:>8}", delta[counter as usize]);
        }
        println!();
    }
}

/// One side of an exchange: a namespace and the address it uses there.
struct End<'a> {
    name: &'a str,
    ns: &'a Netns,
    ip: IpAddr,
}

impl<'a> End<'a> {
    fn pod(pod: &'a Pod, v6: bool) -> Self {
        let ip = if v6 { pod.ipv6.into() } else { pod.ipv4.into() };
        Self {
            name: &pod.name,
            ns: &pod.ns,
            ip,
        }
    }
}

/// A listener on the server side, a client on the client side: connect, send, echo, compare.
fn tcp_echo(client: &End<'_>, server: &End<'_>) -> anyhow::Result<()> {
    let (client_ip, server_ip) = (client.ip, server.ip);
    let listener = server.ns.run(|| {
        let listener = TcpListener::bind(SocketAddr::new(server_ip, 0))?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    })?;
    let server_addr = listener.local_addr()?;
    let mut stream = client.ns.run(|| {
        TcpStream::connect_timeout(&server_addr, IO_TIMEOUT)
            .with_context(|| format!("connecting to {server_addr}"))
    })?;
    set_timeouts(&stream)?;
    let (mut conn, peer) = accept(&listener)?;
    ensure!(
        peer.ip() == client_ip,
        "the server saw the connection from {peer}, expected {client_ip}"
    );
    conn.set_nonblocking(false)?;
    set_timeouts(&conn)?;

    let message = format!("hello {} -> {} over tcp", client.name, server.name);
    stream
        .write_all(message.as_bytes())
        .context("client write")?;
    let mut received = vec![0; message.len()];
    conn.read_exact(&mut received).context("server read")?;
    conn.write_all(&received).context("server echo")?;
    let mut echoed = vec![0; message.len()];
    stream
        .read_exact(&mut echoed)
        .context("client read of the echo")?;
    ensure!(
        echoed == message.as_bytes(),
        "echo differs: sent {message:?}, got {:?}",
        String::from_utf8_lossy(&echoed)
    );
    Ok(())
}

fn set_timeouts(stream: &TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))
}

/// Accepts one connection, polling the non-blocking listener for at most [`IO_TIMEOUT`].
fn accept(listener: &TcpListener) -> anyhow::Result<(TcpStream, SocketAddr)> {
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        match listener.accept() {
            Ok(accepted) => return Ok(accepted),
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e).context("accepting the connection"),
        }
    }
}

/// A request from the client side, answered by the server side; returns the attempt that got
/// the answer.
fn udp_request_response(client: &End<'_>, server: &End<'_>) -> anyhow::Result<u32> {
    let (client_ip, server_ip) = (client.ip, server.ip);
    let server_sock = server
        .ns
        .run(|| Ok(UdpSocket::bind(SocketAddr::new(server_ip, 0))?))?;
    let client_sock = client
        .ns
        .run(|| Ok(UdpSocket::bind(SocketAddr::new(client_ip, 0))?))?;
    let wait = IO_TIMEOUT / UDP_ATTEMPTS;
    server_sock.set_read_timeout(Some(wait))?;
    client_sock.set_read_timeout(Some(wait))?;
    let server_addr = server_sock.local_addr()?;
    let request = format!("request {} -> {} over udp", client.name, server.name);
    let mut buf = [0u8; 512];
    for attempt in 1..=UDP_ATTEMPTS {
        client_sock.send_to(request.as_bytes(), server_addr)?;
        let (n, from) = match server_sock.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) => return Err(e).context("server receive"),
        };
        ensure!(
            from == client_sock.local_addr()?,
            "request came from {from}"
        );
        ensure!(&buf[..n] == request.as_bytes(), "request garbled");
        let response = format!("response to {}", String::from_utf8_lossy(&buf[..n]));
        server_sock.send_to(response.as_bytes(), from)?;
        let (n, from) = match client_sock.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) => return Err(e).context("client receive"),
        };
        ensure!(from == server_addr, "response came from {from}");
        ensure!(&buf[..n] == response.as_bytes(), "response garbled");
        return Ok(attempt);
    }
    bail!("no answer after {UDP_ATTEMPTS} attempts of {wait:?}")
}
