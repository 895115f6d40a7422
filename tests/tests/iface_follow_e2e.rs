//! End-to-end proof that `svc-agent run` follows pod-facing interfaces over netlink: started on
//! a node without pods, it attaches `svc_tc_from_pod` / `svc_tc_to_pod` to a pod's veth created
//! afterwards (the kernel lists them on its TCX hooks once each, and the counters move when the
//! pod talks to a pod on the other node), forgets a deleted one and keeps running, detaches
//! from one renamed out of `svcpod*` and attaches again when it is renamed back. A second test
//! starts the agent with a pod already there: the startup attach and the follower's own
//! listing overlap, and the programs are still there once.
//!
//! The programs on an interface are read with `BPF_PROG_QUERY` on its TCX hooks (aya's
//! `query_tcx`, from a thread in the node's namespace): the bpftool of the test machines (7.1)
//! predates TCX in `bpftool net` and lists nothing there.
//!
//! Needs root (namespaces, bpffs, cgroups, eBPF) and the `svc-agent` binary
//! (`cargo build -p svc-agent`): fails, never skips, without them.

use std::{
    io::ErrorKind,
    net::{SocketAddr, UdpSocket},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use aya::programs::{SchedClassifier, TcAttachType};
use svc_agent::inspect::read_pkt_stats;
use svc_common::stats::PktCounter;
use svc_tests::netns::{self, Node, POD_IFNAME_PREFIX, Pod, Process, Topology};

/// How long the agent may take to load its programs and print "svc-agent running".
const AGENT_START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long an attach or detach may take to show after the interface changed.
const FOLLOW_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll interval of the bounded waits.
const POLL: Duration = Duration::from_millis(25);
/// Request/response rounds of the traffic check, each bounded by [`UDP_WAIT`].
const UDP_ROUNDS: u32 = 3;
/// How long one UDP receive waits.
const UDP_WAIT: Duration = Duration::from_secs(2);

const FROM_POD: &str = svc_agent::loader::PROG_TC_FROM_POD;
const TO_POD: &str = svc_agent::loader::PROG_TC_TO_POD;

fn must_be_root() {
    if let Err(e) = netns::require_root() {
        panic!("{e:#}");
    }
}

/// `target/<profile>/svc-agent`: a test binary lives in `target/<profile>/deps`.
fn agent_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("locating the test executable");
    let profile_dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("the test executable lives in target/<profile>/deps");
    let bin = profile_dir.join("svc-agent");
    assert!(
        bin.is_file(),
        "svc-agent binary not found at {}: build it first with `cargo build -p svc-agent`",
        bin.display()
    );
    bin
}

/// Whether `svc-agent run` takes `flag` (read from its `--help`).
fn agent_takes(binary: &std::path::Path, flag: &str) -> bool {
    let help = Command::new(binary)
        .args(["run", "--help"])
        .output()
        .expect("running svc-agent run --help");
    String::from_utf8_lossy(&help.stdout).contains(flag)
}

/// Starts `svc-agent run` in `node`'s namespace and cgroup, following `svcpod*` (pod-facing),
/// `eth0` (node-facing: the node's uplink) and an empty directory of objects (without `--from-dir` the agent follows a Kubernetes API server), and
/// waits until it says it is running.
fn start_agent(node: &Node) -> Process {
    let binary = agent_binary();
    // Beside the node's bpffs, inside the run directory the topology removes.
    let objects = node.bpffs.with_file_name("no-objects");
    std::fs::create_dir_all(&objects).expect("creating an empty object directory");
    let mut command = Command::new(&binary);
    command
        .arg("--bpffs")
        .arg(&node.bpffs)
        .args(["run", "--node-name", &node.name, "--pod-ifaces"])
        .arg(format!("{POD_IFNAME_PREFIX}*"))
        .args(["--node-ifaces", netns::ETH0])
        .arg("--from-dir")
        .arg(&objects)
        .args([
            "--max-service-entries",
            "4096",
            "--max-backends",
            "4096",
            "--max-conntrack-entries",
            "16384",
        ])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    // Connect-time programs (where the agent has them) go on the node's cgroup, never on the
    // machine's root cgroup (the agent's default).
    if agent_takes(&binary, "--cgroup") {
        command.arg("--cgroup").arg(&node.cgroup);
    }
    let mut agent = node.spawn(&command).expect("spawning svc-agent");
    agent
        .wait_for_output("svc-agent running", AGENT_START_TIMEOUT)
        .expect("svc-agent starts");
    assert!(
        agent.output().contains("following pod-facing interfaces"),
        "{} does not follow interfaces (an old build?): rebuild it with \
         `cargo build -p svc-agent`; its output:\n{}",
        binary.display(),
        agent.output()
    );
    agent
}

/// `(hook, program)` pairs the kernel has on the TCX hooks of `iface` in `node`'s namespace,
/// e.g. `("tcx/ingress", "svc_tc_from_pod")`.
fn tc_programs(node: &Node, iface: &str) -> anyhow::Result<Vec<(String, String)>> {
    node.ns.run(|| {
        let mut found = Vec::new();
        for (hook, at) in [
            ("tcx/ingress", TcAttachType::Ingress),
            ("tcx/egress", TcAttachType::Egress),
        ] {
            let (_, progs) = SchedClassifier::query_tcx(iface, at)
                .with_context(|| format!("querying {hook} of {iface}"))?;
            found.extend(progs.iter().map(|p| {
                let name = p.name_as_str().unwrap_or("?");
                (hook.to_owned(), name.to_owned())
            }));
        }
        Ok(found)
    })
}

/// Whether `iface` has exactly the two pod-facing programs, once each, where they belong.
fn has_pod_programs(progs: &[(String, String)]) -> bool {
    let count = |hook: &str, name: &str| {
        progs
            .iter()
            .filter(|(h, n)| h.ends_with(hook) && n == name)
            .count()
    };
    count("/ingress", FROM_POD) == 1 && count("/egress", TO_POD) == 1 && progs.len() == 2
}

/// Polls `check` every [`POLL`] until it returns `Some`, for at most `timeout`, failing early
/// if the agent exits. Returns what `check` returned.
fn wait_until<T>(
    agent: &mut Process,
    what: &str,
    timeout: Duration,
    mut check: impl FnMut(&Process) -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(found) = check(agent)? {
            return Ok(found);
        }
        if let Some(status) = agent.try_status()? {
            bail!(
                "svc-agent exited ({status}) while waiting for {what}; output:\n{}",
                agent.output()
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "no {what} within {timeout:?}; agent output:\n{}",
                agent.output()
            );
        }
        std::thread::sleep(POLL);
    }
}

/// Waits until the kernel has both programs on `iface`, once each.
fn wait_attached(agent: &mut Process, node: &Node, iface: &str) -> anyhow::Result<()> {
    let mut last = Vec::new();
    wait_until(
        agent,
        &format!("programs on {iface}"),
        FOLLOW_TIMEOUT,
        |_| {
            last = tc_programs(node, iface)?;
            Ok(has_pod_programs(&last).then_some(()))
        },
    )
    .with_context(|| format!("last listing of {iface}'s TCX hooks: {last:?}"))
}

/// Waits until the agent has printed a line holding every one of `words`; returns it.
fn wait_log(agent: &mut Process, words: &[&str]) -> anyhow::Result<String> {
    wait_until(
        agent,
        &format!("log line with {words:?}"),
        FOLLOW_TIMEOUT,
        |a| {
            Ok(a.output()
                .lines()
                .find(|l| words.iter().all(|w| l.contains(w)))
                .map(str::to_owned))
        },
    )
}

/// How many log lines hold every one of `words`.
fn count_log(agent: &Process, words: &[&str]) -> usize {
    agent
        .output()
        .lines()
        .filter(|l| words.iter().all(|w| l.contains(w)))
        .count()
}

/// UDP request/response rounds from `client` to `server`; returns how many were answered.
fn udp_rounds(client: &Pod, server: &Pod) -> anyhow::Result<u32> {
    let (client_ip, server_ip) = (client.ipv4, server.ipv4);
    let server_sock = server
        .ns
        .run(|| Ok(UdpSocket::bind(SocketAddr::new(server_ip.into(), 0))?))?;
    let client_sock = client
        .ns
        .run(|| Ok(UdpSocket::bind(SocketAddr::new(client_ip.into(), 0))?))?;
    server_sock.set_read_timeout(Some(UDP_WAIT))?;
    client_sock.set_read_timeout(Some(UDP_WAIT))?;
    let server_addr = server_sock.local_addr()?;
    let mut buf = [0u8; 256];
    let mut answered = 0;
    for round in 0..UDP_ROUNDS {
        let request = format!("round {round} from {}", client.name);
        client_sock.send_to(request.as_bytes(), server_addr)?;
        let (n, from) = match server_sock.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) => return Err(e).context("server receive"),
        };
        ensure!(&buf[..n] == request.as_bytes(), "request garbled");
        server_sock.send_to(&buf[..n], from)?;
        match client_sock.recv_from(&mut buf) {
            Ok((n, from)) if from == server_addr && &buf[..n] == request.as_bytes() => {
                answered += 1;
            }
            Ok((_, from)) => bail!("unexpected answer from {from}"),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(e).context("client receive"),
        }
    }
    Ok(answered)
}

fn udp_packets(node: &Node) -> u64 {
    read_pkt_stats(&node.bpffs)
        .expect("reading the agent's pinned counters")
        .iter()
        .find(|(c, _)| *c == PktCounter::Udp)
        .map_or(0, |(_, v)| v.packets)
}

#[test]
fn agent_follows_pod_interfaces_created_deleted_and_renamed_after_it_started() {
    must_be_root();
    let started = Instant::now();
    let step = |what: &str| println!("[{:>6.2}s] {what}", started.elapsed().as_secs_f64());

    let mut topo = Topology::new().expect("building the topology");
    let node1 = topo.node(0).clone();
    assert!(node1.pod_ifnames.is_empty(), "node1 starts without pods");
    let mut agent = start_agent(&node1);
    assert!(
        agent.output().contains("pod_facing=0 node_facing=1"),
        "the agent should find no pod interface and eth0 at startup:\n{}",
        agent.output()
    );
    step(&format!(
        "topology {} up, svc-agent running on {} with no pod",
        topo.prefix(),
        node1.name
    ));

    // A pod appears on node1 (and one on node2 to talk to).
    let client = topo.add_pod(0, "client").expect("adding a pod on node1");
    let server = topo.add_pod(1, "server").expect("adding a pod on node2");
    let iface = client.host_ifname.clone();
    wait_attached(&mut agent, &node1, &iface).unwrap_or_else(|e| panic!("{e:#}"));
    let line = wait_log(&mut agent, &["attached", &format!("iface={iface}")])
        .unwrap_or_else(|e| panic!("{e:#}"));
    step(&format!(
        "{iface} appeared: both programs on its TCX hooks; agent: {line}"
    ));

    // The programs are on the path: pod1's traffic moves node1's counters.
    let before = udp_packets(&node1);
    let answered = udp_rounds(&client, &server).unwrap_or_else(|e| panic!("UDP: {e:#}"));
    assert!(answered > 0, "no UDP round between the pods was answered");
    let moved = udp_packets(&node1) - before;
    assert!(
        moved >= u64::from(answered),
        "node1's udp counter moved by {moved} for {answered} answered rounds"
    );
    step(&format!(
        "{answered}/{UDP_ROUNDS} UDP rounds {} -> {}: node1's udp counter moved by {moved}",
        client.ipv4, server.ipv4
    ));

    // The pod's veth goes: the agent forgets it and keeps running.
    node1
        .ns
        .ip(["link", "del", &iface])
        .expect("deleting the pod's veth");
    let line = wait_log(&mut agent, &["gone", &format!("iface={iface}")])
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        agent.try_status().unwrap().is_none(),
        "svc-agent exited after {iface} went:\n{}",
        agent.output()
    );
    step(&format!("{iface} deleted; agent: {line}"));

    // A later pod still gets the programs.
    let late = topo
        .add_pod(0, "late")
        .expect("adding a second pod on node1");
    let late_if = late.host_ifname.clone();
    wait_attached(&mut agent, &node1, &late_if).unwrap_or_else(|e| panic!("{e:#}"));
    step(&format!("{late_if} appeared after the deletion: attached"));

    // Renamed out of the patterns: detached; renamed back: attached again, once.
    let moved_if = "svcmoved1";
    node1
        .ns
        .ip_batch(&[
            format!("link set {late_if} down"),
            format!("link set {late_if} name {moved_if}"),
        ])
        .expect("renaming the pod's veth");
    wait_log(&mut agent, &["renamed out", &format!("iface={late_if}")])
        .unwrap_or_else(|e| panic!("{e:#}"));
    let left = tc_programs(&node1, moved_if).expect("querying TCX");
    assert!(left.is_empty(), "{moved_if} kept programs: {left:?}");
    step(&format!("{late_if} renamed to {moved_if}: detached"));
    let attaches = count_log(&agent, &["attached", &format!("iface={late_if}")]);
    node1
        .ns
        .ip_batch(&[
            format!("link set {moved_if} name {late_if}"),
            format!("link set {late_if} up"),
        ])
        .expect("renaming the pod's veth back");
    wait_until(
        &mut agent,
        &format!("a second attach to {late_if}"),
        FOLLOW_TIMEOUT,
        |a| Ok((count_log(a, &["attached", &format!("iface={late_if}")]) > attaches).then_some(())),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    wait_attached(&mut agent, &node1, &late_if).unwrap_or_else(|e| panic!("{e:#}"));
    step(&format!("renamed back to {late_if}: attached again, once"));

    let output = agent.output();
    for bad in ["could not attach", "ERROR", "lost"] {
        assert!(!output.contains(bad), "the agent said {bad:?}:\n{output}");
    }
    let status = agent.stop().expect("stopping svc-agent");
    assert!(status.success(), "svc-agent ended with {status}");
    step("svc-agent stopped cleanly");
}

#[test]
fn an_interface_present_at_startup_gets_the_programs_once() {
    must_be_root();
    let mut topo = Topology::new().expect("building the topology");
    let pod = topo.add_pod(0, "early").expect("adding a pod on node1");
    let node1 = topo.node(0).clone();
    let iface = pod.host_ifname.clone();
    let mut agent = start_agent(&node1);
    // The follower's first listing finds the interface and attaches it.
    wait_log(&mut agent, &["attached", &format!("iface={iface}")])
        .unwrap_or_else(|e| panic!("{e:#}"));
    let progs = tc_programs(&node1, &iface).expect("querying TCX");
    assert!(
        has_pod_programs(&progs),
        "{iface} should carry each program once: {progs:?}\nagent output:\n{}",
        agent.output()
    );
    println!("{iface} present at startup: {progs:?}");
    let status = agent.stop().expect("stopping svc-agent");
    assert!(status.success(), "svc-agent ended with {status}");
}
