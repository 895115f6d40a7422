//! `cargo xtask demo`: two emulated nodes in network namespaces, one `svc-agent` per node
//! (standalone, its maps pinned in the node's own bpffs), real TCP and UDP traffic between pods
//! on different nodes, and the agent's counters (`svc-agent inspect stats`) moving with it.
//!
//! Bounded (a fixed number of rounds, every socket with a timeout) and self-cleaning: the
//! topology guard removes every namespace, mount, cgroup and process it created, also on error.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};
use svc_tests::netns::{Netns, Topology};

const ROUNDS: usize = 3;
const REQUESTS_PER_ROUND: usize = 20;
const IO_TIMEOUT: Duration = Duration::from_secs(3);
const PORT: u16 = 5000;

fn main() -> anyhow::Result<()> {
    let agent = sibling_binary("svc-agent")?;
    println!(
        "svc demo: building two nodes, a pod on each and an external client (198.18.0.0/15, 2001:db8::/32)"
    );
    let mut topo = Topology::new()?;
    let client = topo.add_pod(0, "client")?;
    let server = topo.add_pod(1, "server")?;
    println!(
        "  node1 {} (pod client {} / {} on {})\n  node2 {} (pod server {} / {} on {})",
        topo.node(0).underlay_v4,
        client.ipv4,
        client.ipv6,
        client.host_ifname,
        topo.node(1).underlay_v4,
        server.ipv4,
        server.ipv6,
        server.host_ifname
    );

    let mut agents = Vec::new();
    for node in topo.nodes() {
        let mut cmd = Command::new(&agent);
        cmd.args(["--bpffs"])
            .arg(&node.bpffs)
            .args(["run", "--node-name", &node.name, "--pod-ifaces", "svcpod*"])
            .env("RUST_LOG", "info");
        let mut p = node.spawn(&cmd)?;
        p.wait_for_output("svc-agent running", Duration::from_secs(10))
            .with_context(|| format!("svc-agent on {} did not start", node.name))?;
        println!(
            "  svc-agent running on {} (pinned state in {}/svc/v1)",
            node.name,
            node.bpffs.display()
        );
        agents.push(p);
    }

    let server_ns = server.ns.clone();
    let client_ns = client.ns.clone();
    let servers = start_servers(&server_ns, &[server.ipv4.into(), server.ipv6.into()])?;
    for round in 1..=ROUNDS {
        let before: Vec<_> = topo
            .nodes()
            .iter()
            .map(|n| stats(&agent, &n.bpffs))
            .collect::<Result<_, _>>()?;
        for i in 0..REQUESTS_PER_ROUND {
            let dst = if i % 2 == 0 {
                std::net::IpAddr::from(server.ipv4)
            } else {
                server.ipv6.into()
            };
            client_ns.run(move || exchange(SocketAddr::new(dst, PORT), i))?;
        }
        let after: Vec<_> = topo
            .nodes()
            .iter()
            .map(|n| stats(&agent, &n.bpffs))
            .collect::<Result<_, _>>()?;
        println!(
            "\nround {round}: {REQUESTS_PER_ROUND} TCP + {REQUESTS_PER_ROUND} UDP requests, client (node1) -> server (node2), half over IPv6"
        );
        println!("  counter            node1 packets (+round)   node2 packets (+round)");
        for (i, (name, n1)) in after[0].iter().enumerate() {
            let n2 = after[1][i].1;
            if n1 + n2 == 0 {
                continue;
            }
            println!(
                "  {name:<18} {n1:>10} (+{:<5})        {n2:>10} (+{:<5})",
                n1 - before[0][i].1,
                n2 - before[1][i].1
            );
        }
    }
    println!(
        "\nfull view from the agent on node1 (`svc-agent --bpffs {} inspect stats`):",
        topo.node(0).bpffs.display()
    );
    print!(
        "{}",
        indent(&run_agent(
            &agent,
            &topo.node(0).bpffs,
            &["inspect", "stats"]
        )?)
    );
    drop(servers);
    for p in agents {
        p.stop()?;
    }
    println!("\nagents stopped; removing the topology");
    drop(topo);
    println!("done: nothing of the demo is left behind");
    Ok(())
}

/// A TCP echo and a UDP echo listener per address, each on its own thread in the server pod.
fn start_servers(
    ns: &Netns,
    addrs: &[std::net::IpAddr],
) -> anyhow::Result<Vec<std::thread::JoinHandle<()>>> {
    let mut handles = Vec::new();
    for addr in addrs {
        let sa = SocketAddr::new(*addr, PORT);
        let (tcp, udp) = ns.run(move || Ok((TcpListener::bind(sa)?, UdpSocket::bind(sa)?)))?;
        // Sockets stay in the namespace they were made in; the threads serving them need not.
        handles.push(std::thread::spawn(move || {
            for _ in 0..ROUNDS * REQUESTS_PER_ROUND {
                let Ok((mut s, _)) = tcp.accept() else { return };
                let _ = s.set_read_timeout(Some(IO_TIMEOUT));
                let mut buf = [0u8; 64];
                if let Ok(n) = s.read(&mut buf) {
                    let _ = s.write_all(&buf[..n]);
                }
            }
        }));
        handles.push(std::thread::spawn(move || {
            let _ = udp.set_read_timeout(Some(IO_TIMEOUT * 4));
            let mut buf = [0u8; 64];
            for _ in 0..ROUNDS * REQUESTS_PER_ROUND {
                let Ok((n, peer)) = udp.recv_from(&mut buf) else {
                    return;
                };
                let _ = udp.send_to(&buf[..n], peer);
            }
        }));
    }
    Ok(handles)
}

/// One TCP request/response and one UDP request/response to `dst`.
fn exchange(dst: SocketAddr, i: usize) -> anyhow::Result<()> {
    let msg = format!("hello {i}");
    let mut s = TcpStream::connect_timeout(&dst, IO_TIMEOUT)
        .with_context(|| format!("TCP connect to {dst}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.write_all(msg.as_bytes())?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf)?;
    ensure!(
        &buf[..n] == msg.as_bytes(),
        "TCP echo from {dst} was {:?}",
        &buf[..n]
    );
    let bind: SocketAddr = if dst.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let u = UdpSocket::bind(bind)?;
    u.set_read_timeout(Some(IO_TIMEOUT))?;
    u.send_to(msg.as_bytes(), dst)?;
    let (n, from) = u
        .recv_from(&mut buf)
        .with_context(|| format!("UDP reply from {dst}"))?;
    ensure!(
        from == dst && &buf[..n] == msg.as_bytes(),
        "UDP echo from {from} was {:?}",
        &buf[..n]
    );
    Ok(())
}

/// Counter name -> packets, from `svc-agent inspect stats`.
fn stats(agent: &Path, bpffs: &Path) -> anyhow::Result<Vec<(String, u64)>> {
    let out = run_agent(agent, bpffs, &["inspect", "stats"])?;
    out.lines()
        .skip(1)
        .map(|l| {
            let mut f = l.split_whitespace();
            let name = f.next().context("empty stats line")?.to_owned();
            let packets = f.next().context("no packets column")?.parse()?;
            Ok((name, packets))
        })
        .collect()
}

fn run_agent(agent: &Path, bpffs: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(agent)
        .arg("--bpffs")
        .arg(bpffs)
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!(
            "svc-agent {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().context("no parent dir")?.join(name);
    ensure!(
        path.exists(),
        "{} not found: build it first (cargo xtask demo does)",
        path.display()
    );
    Ok(path)
}

fn indent(s: &str) -> String {
    s.lines().flat_map(|l| ["  ", l, "\n"]).collect()
}
