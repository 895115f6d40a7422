//! `cargo xtask demo`: a Kubernetes `ClusterIP` Service served by the svc dataplane, end to end.
//!
//! Two emulated nodes in network namespaces, one `svc-agent run --from-dir` per node (its maps
//! pinned in the node's own bpffs), fed the real Kubernetes objects of `manifests/demo/` (a
//! `frontend` Deployment, `frontend-svc` with three endpoints, `db-svc`, the two Nodes) copied
//! into a directory the demo then edits live. Pods are created with the addresses those
//! manifests list; each backend pod runs a small server that answers with the pod's name. A
//! client pod sends real requests to `frontend-svc`'s `ClusterIP`, the demo shows who answered,
//! what the agent programmed and counted, then removes one endpoint from the `EndpointSlice`
//! and shows the traffic moving to the others.
//!
//! Bounded (fixed request counts, every socket with a timeout, every wait with a deadline) and
//! self-cleaning: the topology guard removes every namespace, mount, cgroup and process it
//! created, also on error. Exits non-zero when something did not work.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use svc_tests::{
    k8s::{self, Agent, Backends, ManifestDir},
    netns::{Pod, Topology},
};

/// Where the bundled objects are (override with `SVC_DEMO_MANIFESTS`).
const MANIFESTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/demo");
/// The file holding `frontend-svc`'s `EndpointSlice` (edited live).
const SLICE_FILE: &str = "frontend-svc-endpointslice.yaml";
/// `frontend-svc`'s `ClusterIP` and port, as in `frontend-svc.yaml`.
const FRONTEND_VIP: &str = "198.19.0.10:80";
/// `db-svc`'s `ClusterIP` and port, as in `db-svc.yaml`.
const DB_VIP: &str = "198.19.0.20:5432";
/// The frontend container port (`http`).
const FRONTEND_PORT: u16 = 5000;
/// The database port.
const DB_PORT: u16 = 5432;

/// The pods, in creation order per node (node1's get .10, .11, ...; node2's too): the
/// addresses in `manifests/demo` follow from this order.
const PODS: [(usize, &str); 5] = [
    (0, "client"),
    (0, "frontend-7d9c8b6f5-2xkqp"),
    (0, "frontend-7d9c8b6f5-9hm4t"),
    (1, "frontend-7d9c8b6f5-lw8zn"),
    (1, "db-0"),
];
/// The endpoint the demo removes (the frontend pod on node2).
const REMOVED: &str = "frontend-7d9c8b6f5-lw8zn";

/// Requests per round.
const REQUESTS: usize = 30;
/// Bound on every connect, read and write.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the agents may take to apply the edit.
const SYNC_TIMEOUT: Duration = Duration::from_secs(5);

/// The running demo. Fields drop in order: servers, agents, then the topology (whose guard
/// removes everything, the copied objects included).
struct Demo {
    backends: Backends,
    agents: Vec<Agent>,
    manifests: ManifestDir,
    topo: Topology,
    /// `frontend-svc`'s endpoints' pods, each with the letter that stands for it.
    letters: Vec<(char, String)>,
    frontend_vip: SocketAddr,
}

fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    let mut demo = setup()?;
    let vip = demo.frontend_vip;
    println!("\nnode1's agent programmed (svc-agent inspect services):");
    print!("{}", indent(&demo.agents[0].inspect("services")?));

    println!("\n{REQUESTS} requests from client (node1) to frontend-svc {vip}:");
    let first = round(&demo)?;
    let db_vip: SocketAddr = DB_VIP.parse()?;
    let answer = pod(&demo.topo, "client")?
        .ns
        .run(move || k8s::tcp_request(db_vip, "select-1", IO_TIMEOUT))?;
    println!("  and one to db-svc {db_vip}: answered by {}", answer.label);
    for (_, name) in &demo.letters {
        ensure!(
            first.get(name).copied().unwrap_or_default() > 0,
            "{name} got none of {REQUESTS} requests (chance 3 x (2/3)^30 = 1.6e-5 if all is well)"
        );
    }
    println!("\nper-frontend and per-backend counters on node1 (svc-agent inspect services):");
    print!("{}", indent(&demo.agents[0].inspect("services")?));
    println!("\ncounters on node1 (svc-agent inspect stats, zero rows left out):");
    print!("{}", nonzero_rows(&demo.agents[0].inspect("stats")?));

    remove_and_wait(&mut demo)?;
    println!("\n{REQUESTS} more requests to frontend-svc {vip}:");
    let second = round(&demo)?;
    ensure!(
        !second.contains_key(REMOVED),
        "the removed endpoint {REMOVED} still got requests"
    );
    for (_, name) in demo.letters.iter().filter(|(_, n)| n != REMOVED) {
        ensure!(
            second.get(name).copied().unwrap_or_default() > 0,
            "{name} got none of {REQUESTS} requests after the edit"
        );
    }
    println!("  -> {REMOVED} gets nothing; the traffic moved to the other two");

    teardown(demo)?;
    println!(
        "\ndone in {:.1} s: agents stopped, namespaces, mounts and cgroups removed",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Topology and pods, the objects copied and checked, one agent per node, the servers.
fn setup() -> anyhow::Result<Demo> {
    let agent_bin = k8s::agent_binary()?;
    let source = std::env::var_os("SVC_DEMO_MANIFESTS")
        .map_or_else(|| PathBuf::from(MANIFESTS), PathBuf::from);
    let frontend_vip: SocketAddr = FRONTEND_VIP.parse()?;

    println!(
        "svc demo: a ClusterIP Service on two emulated nodes (198.18.0.0/15 inside network \
         namespaces)"
    );
    let mut topo = Topology::new()?;
    for (node, name) in PODS {
        topo.add_pod(node, name)?;
    }
    for node in topo.nodes() {
        let pods: Vec<String> = topo
            .pods()
            .iter()
            .filter(|p| p.node == node.index)
            .map(|p| format!("{} {}", p.name, p.ipv4))
            .collect();
        println!("  {} {}: {}", node.name, node.underlay_v4, pods.join(", "));
    }

    // The objects, copied so the demo can edit them; checked against the pods just made.
    let manifests = ManifestDir::create(&topo.run_dir().join("manifests"))?;
    let files = copy_manifests(&source, &manifests)?;
    let names = check_addresses(manifests.path(), topo.pods())?;
    println!(
        "  objects from {} ({}) copied to {}",
        display(&source),
        files.join(", "),
        manifests.path().display()
    );
    println!(
        "  frontend-svc {frontend_vip} -> {} endpoints; db-svc {DB_VIP} -> 1 endpoint",
        names.len()
    );

    let mut agents = Vec::new();
    for node in topo.nodes() {
        agents.push(
            Agent::start(&agent_bin, node, manifests.path())
                .with_context(|| format!("starting svc-agent on {}", node.name))?,
        );
    }
    println!(
        "  svc-agent running on node1 and node2 ({} --from-dir {})",
        display(&agent_bin),
        manifests.path().display()
    );

    let backends = Backends::new();
    for pod in topo.pods() {
        let port = match pod.name.as_str() {
            "client" => continue,
            "db-0" => DB_PORT,
            _ => FRONTEND_PORT,
        };
        backends.serve(&pod.ns, &pod.name, SocketAddr::new(pod.ipv4.into(), port))?;
    }
    let letters = names
        .into_iter()
        .zip('a'..)
        .map(|(name, letter)| (letter, name))
        .collect();
    Ok(Demo {
        backends,
        agents,
        manifests,
        topo,
        letters,
        frontend_vip,
    })
}

/// Removes [`REMOVED`] from the slice, as the `EndpointSlice` controller does when a pod goes,
/// and waits until both agents synced and node1 no longer programs it.
fn remove_and_wait(demo: &mut Demo) -> anyhow::Result<()> {
    let before: Vec<usize> = demo.agents.iter().map(Agent::syncs).collect();
    let t = Instant::now();
    let removed_addr = remove_endpoint(&demo.manifests, SLICE_FILE, REMOVED)?;
    for (agent, before) in demo.agents.iter_mut().zip(before) {
        agent.wait_syncs(before + 1, SYNC_TIMEOUT)?;
    }
    let gone = format!("{removed_addr}:{FRONTEND_PORT}");
    let key = k8s::frontend_key(demo.frontend_vip, k8s::Protocol::Tcp);
    let deadline = Instant::now() + SYNC_TIMEOUT;
    loop {
        let programmed = demo.agents[0].services()?;
        let backends = programmed.backends(&key).unwrap_or_default();
        if backends.len() == demo.letters.len() - 1 && !backends.contains(&gone) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "node1 still programs {gone} {SYNC_TIMEOUT:?} after the edit:\n{}",
            programmed.text
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "\nedited {SLICE_FILE}: removed endpoint {REMOVED} ({removed_addr}); node1 reprogrammed \
         {:.0} ms later:",
        t.elapsed().as_secs_f64() * 1e3
    );
    print!("{}", indent(&demo.agents[0].inspect("services")?));
    Ok(())
}

/// Stops servers and agents (which must exit cleanly) and removes the topology; checks that
/// nothing of it is left.
fn teardown(demo: Demo) -> anyhow::Result<()> {
    let Demo {
        backends,
        agents,
        topo,
        ..
    } = demo;
    drop(backends);
    for agent in agents {
        let node = agent.node().to_owned();
        let status = agent.stop()?;
        ensure!(status.success(), "svc-agent on {node} ended with {status}");
    }
    let prefix = topo.prefix().to_owned();
    drop(topo);
    let left = svc_tests::netns::leftovers(&prefix)?;
    ensure!(left.is_empty(), "left behind: {left:?}");
    Ok(())
}

/// Copies every `*.yaml` of `source` into `dir` (each checked by the agent's own loader).
fn copy_manifests(source: &Path, dir: &ManifestDir) -> anyhow::Result<Vec<String>> {
    let entries = fs::read_dir(source).with_context(|| {
        format!(
            "reading the demo manifests in {} (set SVC_DEMO_MANIFESTS to their directory)",
            source.display()
        )
    })?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .context("odd file name")?
                .to_owned();
            let text =
                fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            dir.write(&name, &text)?;
            files.push(name);
        }
    }
    files.sort();
    ensure!(
        files.iter().any(|f| f == SLICE_FILE),
        "no {SLICE_FILE} in {}",
        source.display()
    );
    Ok(files)
}

/// Checks that every endpoint in the objects names a pod the demo made, with that pod's
/// address; returns the names of frontend-svc's endpoints' pods.
fn check_addresses(dir: &Path, pods: &[Pod]) -> anyhow::Result<Vec<String>> {
    let loaded = svc_agent::source::load_dir(dir)?;
    let mut frontends = Vec::new();
    for slice in &loaded.snapshot.slices {
        let service = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kubernetes.io/service-name"))
            .cloned()
            .unwrap_or_default();
        for ep in &slice.endpoints {
            let name = ep
                .target_ref
                .as_ref()
                .and_then(|r| r.name.clone())
                .context("an endpoint without targetRef.name")?;
            let pod = pods.iter().find(|p| p.name == name).with_context(|| {
                format!("the objects name pod {name}, which the demo does not create")
            })?;
            let listed = ep.addresses.first().map(String::as_str).unwrap_or_default();
            ensure!(
                listed == pod.ipv4.to_string(),
                "{name} is {listed} in the objects but {} in the topology: fix manifests/demo",
                pod.ipv4
            );
            if service == "frontend-svc" {
                frontends.push(name);
            }
        }
    }
    ensure!(
        frontends.iter().any(|n| n == REMOVED),
        "{REMOVED} is not an endpoint of frontend-svc"
    );
    Ok(frontends)
}

/// Removes the endpoint whose `targetRef` names `pod` from the slice in `file` (a text edit,
/// like `kubectl edit`, keeping everything else as it is) and returns its address.
fn remove_endpoint(dir: &ManifestDir, file: &str, pod: &str) -> anyhow::Result<String> {
    let path = dir.path().join(file);
    let text = fs::read_to_string(&path)?;
    let lines: Vec<&str> = text.lines().collect();
    // An endpoint is a `- addresses:` item at column 0, up to the next item or top-level key.
    let starts: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with("- addresses:"))
        .map(|(i, _)| i)
        .collect();
    for start in starts {
        let end = (start + 1..lines.len())
            .find(|&i| !lines[i].starts_with(' '))
            .unwrap_or(lines.len());
        let block = &lines[start..end];
        if block.iter().any(|l| l.trim() == format!("name: {pod}")) {
            let address = block
                .get(1)
                .and_then(|l| l.trim().strip_prefix("- "))
                .context("no address in the endpoint")?
                .to_owned();
            let mut kept: Vec<&str> = lines[..start].to_vec();
            kept.extend_from_slice(&lines[end..]);
            dir.write(file, &(kept.join("\n") + "\n"))?;
            return Ok(address);
        }
    }
    bail!("no endpoint for {pod} in {}", path.display())
}

/// Sends [`REQUESTS`] requests (each a new TCP connection) from the client pod to
/// `frontend-svc`, prints who answered each (one letter per request) and the tally; returns
/// the tally.
fn round(demo: &Demo) -> anyhow::Result<BTreeMap<String, usize>> {
    let client = pod(&demo.topo, "client")?;
    let client_ip = IpAddr::from(client.ipv4);
    let vip = demo.frontend_vip;
    let answers = client.ns.run(move || {
        (0..REQUESTS)
            .map(|i| {
                let answer = k8s::tcp_request(vip, &format!("GET-{i}"), IO_TIMEOUT)?;
                ensure!(
                    answer.client_seen == client_ip,
                    "{} saw the client as {}",
                    answer.label,
                    answer.client_seen
                );
                Ok(answer.label)
            })
            .collect::<anyhow::Result<Vec<String>>>()
    })?;
    let letter = |name: &str| {
        demo.letters
            .iter()
            .find(|(_, n)| n == name)
            .map_or('?', |(l, _)| *l)
    };
    let sequence: String = answers.iter().map(|a| letter(a)).collect();
    println!("  answered by: {sequence}");
    let mut tally = BTreeMap::new();
    for a in &answers {
        *tally.entry(a.clone()).or_insert(0) += 1;
    }
    for (l, name) in &demo.letters {
        let n = tally.get(name).copied().unwrap_or(0);
        let node = pod(&demo.topo, name).map_or("?", |p| demo.topo.node(p.node).name.as_str());
        println!("  {l} = {name:<26} ({node}) {n:>3} {}", "#".repeat(n));
    }
    Ok(tally)
}

fn pod<'a>(topo: &'a Topology, name: &str) -> anyhow::Result<&'a Pod> {
    topo.pods()
        .iter()
        .find(|p| p.name == name)
        .with_context(|| format!("no pod {name}"))
}

/// The rows of `inspect stats` whose packet count is not zero, under their table's header
/// (a table with no such row is left out).
fn nonzero_rows(stats: &str) -> String {
    let mut out = String::new();
    let mut header = None;
    for line in stats.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let count = match fields.as_slice() {
            [_, packets, _] => packets.parse::<u64>().ok(),
            _ => None,
        };
        match count {
            None => header = Some(line),
            Some(0) => {}
            Some(_) => {
                if let Some(h) = header.take() {
                    let _ = writeln!(out, "  {h}");
                }
                let _ = writeln!(out, "  {line}");
            }
        }
    }
    out
}

fn indent(s: &str) -> String {
    s.lines().flat_map(|l| ["  ", l, "\n"]).collect()
}

/// A path shown relative to the current directory when it is below it, canonical otherwise.
fn display(path: &Path) -> String {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    std::env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_path_buf))
        .unwrap_or(path)
        .display()
        .to_string()
}
