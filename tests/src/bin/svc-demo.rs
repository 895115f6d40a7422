//! `cargo xtask demo`: a Kubernetes `ClusterIP` Service served by the svc dataplane, end to end.
//!
//! Two emulated nodes in network namespaces, one `svc-agent run --from-dir` per node (its maps
//! pinned in the node's own bpffs), fed the real Kubernetes objects of `manifests/demo/` (a
//! `frontend` Deployment, documentation only; `frontend-svc` selecting `app: frontend`, `db-svc`
//! selecting `app: db`, the two Nodes) copied into a directory the demo then edits live, and
//! the Pods of `pods.yaml` written with the addresses and nodes the harness gave them. No
//! `EndpointSlice` is written: the agents compute them from the Pods, as the `EndpointSlice`
//! controller would. Each backend pod runs a small server that answers with the pod's name. A
//! client pod sends real requests to `frontend-svc`'s `ClusterIP`; the demo shows the
//! selection, who answered, what the agent programmed and counted, then relabels one frontend
//! Pod (`app: frontend` -> `app: canary`) and marks another not Ready, showing the traffic
//! leave each. Last, a client outside the cluster (on the underlay) reaches the Service's
//! `NodePort` on each node: node1 serves it from its own frontend Pod (the Pod sees the
//! client's address), node2 through source NAT to that Pod on node1 (the Pod sees node2).
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

use anyhow::{Context as _, ensure};
use k8s_openapi::api::core::v1::{Pod as PodObject, PodIP};
use svc_tests::{
    k8s::{self, Agent, Backends, ManifestDir},
    netns::{Pod, Topology},
};

/// Where the bundled objects are (override with `SVC_DEMO_MANIFESTS`).
const MANIFESTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/demo");
/// The bundled Pod objects; the demo writes each as `pod-<name>.yaml` with the pod's real
/// address and node instead of copying this file.
const PODS_FILE: &str = "pods.yaml";
/// `frontend-svc`'s `ClusterIP` and port, as in `frontend-svc.yaml`.
const FRONTEND_VIP: &str = "198.19.0.10:80";
/// `frontend-svc`'s `nodePort`, as in `frontend-svc.yaml`.
const FRONTEND_NODE_PORT: u16 = 30080;
/// `db-svc`'s `ClusterIP` and port, as in `db-svc.yaml`.
const DB_VIP: &str = "198.19.0.20:5432";
/// The frontend container port (`http`).
const FRONTEND_PORT: u16 = 5000;
/// The database port.
const DB_PORT: u16 = 5432;

/// The frontend pods (`app: frontend`).
const FRONTENDS: [&str; 3] = [
    "frontend-7d9c8b6f5-2xkqp",
    "frontend-7d9c8b6f5-9hm4t",
    "frontend-7d9c8b6f5-lw8zn",
];
/// The pods, in creation order per node (node1's get .10, .11, ...; node2's too): the
/// addresses in `manifests/demo` follow from this order.
const PODS: [(usize, &str); 5] = [
    (0, "client"),
    (0, "frontend-7d9c8b6f5-2xkqp"),
    (0, "frontend-7d9c8b6f5-9hm4t"),
    (1, "frontend-7d9c8b6f5-lw8zn"),
    (1, "db-0"),
];
/// The frontend Pod the demo relabels (`app: canary`; the one on node2) ...
const RELABELLED: &str = "frontend-7d9c8b6f5-lw8zn";
/// ... and the one it then marks not Ready.
const NOT_READY: &str = "frontend-7d9c8b6f5-9hm4t";

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
    /// The Pod objects the demo wrote (and edits), by name.
    pods: BTreeMap<String, PodObject>,
    /// The frontend pods, each with the letter that stands for it.
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
    check_only(&first, &[])?;
    println!(
        "\nper-frontend and per-backend counters on node1 (svc-agent inspect services; they \
         count translated packets: pods are translated at connect() here, as shipped, so no \
         packet needs it and `sock_xlate` below counts the connections instead):"
    );
    print!("{}", indent(&demo.agents[0].inspect("services")?));
    println!("\ncounters on node1 (svc-agent inspect stats, zero rows left out):");
    print!("{}", nonzero_rows(&demo.agents[0].inspect("stats")?));

    edit_and_wait(
        &mut demo,
        RELABELLED,
        "labels app: frontend -> app: canary",
        |pod| {
            if let Some(labels) = pod.metadata.labels.as_mut() {
                labels.insert("app".to_owned(), "canary".to_owned());
            }
        },
    )?;
    println!("\n{REQUESTS} more requests to frontend-svc {vip}:");
    let second = round(&demo)?;
    check_only(&second, &[RELABELLED])?;
    println!("  -> {RELABELLED} (now app: canary) gets nothing; the other two share the traffic");

    edit_and_wait(
        &mut demo,
        NOT_READY,
        "condition Ready: True -> False",
        |pod| {
            let conditions = pod.status.as_mut().and_then(|s| s.conditions.as_mut());
            for c in conditions.into_iter().flatten() {
                if c.type_ == "Ready" {
                    "False".clone_into(&mut c.status);
                }
            }
        },
    )?;
    println!("\n{REQUESTS} more requests to frontend-svc {vip}:");
    let third = round(&demo)?;
    check_only(&third, &[RELABELLED, NOT_READY])?;
    println!("  -> {NOT_READY} (not Ready) gets nothing either; one frontend Pod is left");

    from_outside(&demo)?;
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

    // The objects, copied so the demo can edit them; the Pods written with the addresses and
    // nodes of the pods just made.
    let manifests = ManifestDir::create(&topo.run_dir().join("manifests"))?;
    let files = copy_manifests(&source, &manifests)?;
    let pods = write_pods(&source.join(PODS_FILE), &topo, &manifests)?;
    println!(
        "  objects from {} ({}) copied to {}, the {} Pods of {PODS_FILE} written as pod-<name>.yaml \
         with their addresses; no EndpointSlice",
        display(&source),
        files.join(", "),
        manifests.path().display(),
        pods.len()
    );
    let names: Vec<String> = pods
        .keys()
        .filter(|n| n.starts_with("frontend-"))
        .cloned()
        .collect();

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
    wait_programmed(&agents[0], frontend_vip, 3)?;
    print_selection(&agents[0]);

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
        pods,
        letters,
        frontend_vip,
    })
}

/// Edits the Pod `name` with `change` (rewriting its file, as `kubectl edit` would change the
/// object), waits until both agents synced, then until node1 programs one frontend backend
/// fewer; shows the new selection and what node1 programs.
fn edit_and_wait(
    demo: &mut Demo,
    name: &str,
    what: &str,
    change: impl FnOnce(&mut PodObject),
) -> anyhow::Result<()> {
    let before: Vec<usize> = demo.agents.iter().map(Agent::syncs).collect();
    let backends_before = programmed_backends(&demo.agents[0], demo.frontend_vip)?.len();
    let pod = demo
        .pods
        .get_mut(name)
        .with_context(|| format!("no Pod {name}"))?;
    change(pod);
    let t = Instant::now();
    write_pod(&demo.manifests, pod)?;
    for (agent, before) in demo.agents.iter_mut().zip(&before) {
        agent.wait_syncs(before + 1, SYNC_TIMEOUT)?;
    }
    wait_programmed(&demo.agents[0], demo.frontend_vip, backends_before - 1)?;
    println!(
        "\nedited pod-{name}.yaml: {what}; node1 reprogrammed {:.0} ms later:",
        t.elapsed().as_secs_f64() * 1e3
    );
    print_selection(&demo.agents[0]);
    print!("{}", indent(&demo.agents[0].inspect("services")?));
    Ok(())
}

/// The backends node1's agent programs for `vip` (TCP).
fn programmed_backends(agent: &Agent, vip: SocketAddr) -> anyhow::Result<Vec<String>> {
    let key = k8s::frontend_key(vip, k8s::Protocol::Tcp);
    Ok(agent
        .services()?
        .backends(&key)
        .unwrap_or_default()
        .into_iter()
        .collect())
}

/// Waits (bounded) until `agent` programs `count` backends for `vip`.
fn wait_programmed(agent: &Agent, vip: SocketAddr, count: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + SYNC_TIMEOUT;
    loop {
        let backends = programmed_backends(agent, vip)?;
        if backends.len() == count {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "node1 programs {backends:?} for {vip}, not {count} backends, {SYNC_TIMEOUT:?} after \
             the change; log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Prints each selector Service's selection as of now: the latest of the agent's `selected ...`
/// lines for it (the agent logs a selection when it changes).
fn print_selection(agent: &Agent) {
    let log = agent.log();
    let mut lines = BTreeMap::new();
    for line in log.lines() {
        if let Some(rest) = line.split_once(" selected ").map(|(_, r)| r) {
            // `default/frontend-svc app==frontend: 3 pods (3 ready) service=...`
            let message = rest.split(" service=").next().unwrap_or(rest);
            if let Some((service, selection)) = message.split_once(' ') {
                lines.insert(service.to_owned(), selection.to_owned());
            }
        }
    }
    println!(
        "  selection (computed by the agent from the Pods, as the EndpointSlice controller would):"
    );
    for (service, selection) in lines {
        println!("    {service:<22} {selection}");
    }
}

/// Checks that every frontend pod but `excluded` answered some of the requests and none of
/// `excluded` did (a pod gets none of 30 with chance (2/3)^30 = 5e-6 if all is well).
fn check_only(tally: &BTreeMap<String, usize>, excluded: &[&str]) -> anyhow::Result<()> {
    for name in excluded {
        ensure!(
            !tally.contains_key(*name),
            "{name} still got requests: {tally:?}"
        );
    }
    let expected = FRONTENDS.iter().filter(|n| !excluded.contains(n));
    for name in expected {
        ensure!(
            tally.get(*name).copied().unwrap_or_default() > 0,
            "{name} got none of {REQUESTS} requests: {tally:?}"
        );
    }
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
        if path.extension().is_some_and(|e| e == "yaml") && !path.ends_with(PODS_FILE) {
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
    Ok(files)
}

/// Reads the Pods of `file` (with the agent's own loader) and writes each, with the address
/// and node the harness gave the pod of that name, as `pod-<name>.yaml`; returns them by name.
fn write_pods(
    file: &Path,
    topo: &Topology,
    dir: &ManifestDir,
) -> anyhow::Result<BTreeMap<String, PodObject>> {
    let loaded = svc_agent::source::load_file(file, &svc_agent::source::Budget::DEFAULT);
    ensure!(
        loaded.errors.is_empty(),
        "{}: {:?}",
        file.display(),
        loaded.errors
    );
    let mut pods = BTreeMap::new();
    for object in loaded.pods {
        let mut object = (*object).clone();
        let name = object.metadata.name.clone().unwrap_or_default();
        let pod = pod(topo, &name)
            .with_context(|| format!("{} names a pod the demo does not create", file.display()))?;
        if let Some(spec) = object.spec.as_mut() {
            spec.node_name = Some(topo.node(pod.node).name.clone());
        }
        let status = object.status.get_or_insert_with(Default::default);
        status.pod_ip = Some(pod.ipv4.to_string());
        status.pod_ips = Some(vec![
            PodIP {
                ip: pod.ipv4.to_string(),
            },
            PodIP {
                ip: pod.ipv6.to_string(),
            },
        ]);
        write_pod(dir, &object)?;
        pods.insert(name, object);
    }
    for name in FRONTENDS.iter().chain(&["db-0"]) {
        ensure!(
            pods.contains_key(*name),
            "no Pod {name} in {}",
            file.display()
        );
    }
    Ok(pods)
}

/// Writes `pod` as `pod-<name>.yaml`.
fn write_pod(dir: &ManifestDir, pod: &PodObject) -> anyhow::Result<()> {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let text = serde_saphyr::to_string(pod).with_context(|| format!("Pod {name} as YAML"))?;
    dir.write(&format!("pod-{name}.yaml"), &text)
}

/// The last step: from the client outside the cluster, requests to `frontend-svc`'s `NodePort`
/// on each node; prints who answered and which client address the Pod saw.
fn from_outside(demo: &Demo) -> anyhow::Result<()> {
    let external = demo.topo.external();
    let outside = IpAddr::from(external.ipv4);
    println!(
        "
from outside the cluster ({outside}, on the underlay), to frontend-svc's NodePort:"
    );
    for node in demo.topo.nodes() {
        let dst = SocketAddr::new(node.underlay_v4.into(), FRONTEND_NODE_PORT);
        let answers = external.ns.run(move || {
            (0..5)
                .map(|i| k8s::tcp_request(dst, &format!("ext-{i}"), IO_TIMEOUT))
                .collect::<anyhow::Result<Vec<_>>>()
        })?;
        let mut seen = BTreeMap::new();
        for a in &answers {
            ensure!(a.from == dst, "the answer came from {}, not {dst}", a.from);
            *seen.entry((a.label.clone(), a.client_seen)).or_insert(0) += 1;
        }
        for ((label, client), n) in seen {
            let how = if client == outside {
                "the client's own address, kept"
            } else {
                "the node's address: source NAT, the reply returns through it"
            };
            println!(
                "  {dst} ({}): {n} answered by {label}, which saw {client} ({how})",
                node.name
            );
        }
    }
    println!(
        "
node2's counters for it (svc-agent inspect stats, zero rows left out):"
    );
    print!("{}", nonzero_rows(&demo.agents[1].inspect("stats")?));
    Ok(())
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
