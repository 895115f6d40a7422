//! End-to-end proof that `svc-agent run` follows node-facing interfaces like pod-facing ones,
//! each in its role: with `--node-ifaces eth0` (what every test agent runs with, see
//! `k8s::Agent::start`) the node's uplink carries `svc_tc_from_world` on TCX ingress and
//! `svc_tc_to_world` on egress while the pods' veths keep `svc_tc_from_pod` / `svc_tc_to_pod`;
//! traffic between pods of the two nodes crosses both uplinks' programs; `inspect links` names
//! each interface's role; an agent killed with SIGKILL and started again takes the node-facing
//! links over (same pins and link ids, this agent's programs); and a rename that moves the
//! uplink into the pod-facing patterns and back swaps its programs in place (same link ids).
//!
//! The programs on a hook are read with `BPF_PROG_QUERY` on its TCX hooks (aya's `query_tcx`,
//! from a thread in the node's namespace), the pins with `svc-agent inspect links -o json`.
//! Runs in both socket modes (`SVC_TEST_SOCKET_LB`, see `cargo xtask test`).
//!
//! Needs root (namespaces, bpffs, cgroups, eBPF) and the `svc-agent` binary
//! (`cargo build -p svc-agent`): fails, never skips, without them.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::programs::{SchedClassifier, TcAttachType};
use svc_agent::{
    ifaces::IfaceRole,
    inspect::PinnedLinkView,
    loader::{PROG_TC_FROM_POD, PROG_TC_FROM_WORLD, PROG_TC_TO_POD, PROG_TC_TO_WORLD},
    pins::TcHook,
};
use svc_tests::{
    k8s::{self, Agent, Backends},
    netns::{ETH0, Node, POD_IFNAME_PREFIX},
    testbed::TestBed,
};

/// How long an attach, swap or take-over may take to show.
const FOLLOW_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll interval of the bounded waits.
const POLL: Duration = Duration::from_millis(25);
/// The pod servers' port.
const PORT: u16 = 8080;
/// Bound of one request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// The programs on the TCX hooks of `iface` in `node`'s namespace: `(hook, name, id)`, names
/// as the kernel keeps them (15 bytes at most: `svc_tc_from_wor`).
fn tcx(node: &Node, iface: &str) -> anyhow::Result<Vec<(TcHook, String, u32)>> {
    node.ns.run(|| {
        let mut found = Vec::new();
        for (hook, at) in [
            (TcHook::Ingress, TcAttachType::Ingress),
            (TcHook::Egress, TcAttachType::Egress),
        ] {
            let (_, progs) = SchedClassifier::query_tcx(iface, at)
                .with_context(|| format!("querying the TCX {} hook of {iface}", hook.name()))?;
            found.extend(
                progs
                    .iter()
                    .map(|p| (hook, p.name_as_str().unwrap_or("?").to_owned(), p.id())),
            );
        }
        Ok(found)
    })
}

/// The role `progs` (one [`tcx`] listing) say the interface has: exactly one program per
/// hook, both of one role, each on its own hook. `None` otherwise.
fn role_on_hooks(progs: &[(TcHook, String, u32)]) -> Option<IfaceRole> {
    let roles: Vec<(IfaceRole, TcHook)> = progs
        .iter()
        .map(|(hook, name, _)| IfaceRole::of_program(name).filter(|(_, h)| h == hook))
        .collect::<Option<_>>()?;
    match roles[..] {
        [(a, TcHook::Ingress), (b, TcHook::Egress)] if a == b => Some(a),
        _ => None,
    }
}

/// The ifindex of `iface` in `node`'s namespace.
fn ifindex(node: &Node, iface: &str) -> u32 {
    let name = iface.to_owned();
    node.ns
        .run(move || Ok(nix::net::if_::if_nametoindex(name.as_str())?))
        .unwrap_or_else(|e| panic!("ifindex of {iface}: {e:#}"))
}

/// The TC links pinned for ifindex `index` (`inspect links -o json`), by hook.
fn pinned_tc(bed: &TestBed, node: usize, index: u32) -> BTreeMap<TcHook, PinnedLinkView> {
    let agent = bed.agent(node);
    let json = k8s::agent_command(
        &bed.agent_bin,
        agent.bpffs(),
        &["inspect", "links", "-o", "json"],
    )
    .unwrap_or_else(|e| panic!("inspect links -o json: {e:#}"));
    let links: Vec<PinnedLinkView> =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    links
        .into_iter()
        .filter_map(|l| {
            let pin = l.pin.to_str()?.to_owned();
            let hook = pin
                .strip_prefix(&format!("tc/{index}/"))
                .and_then(TcHook::from_name)?;
            Some((hook, l))
        })
        .collect()
}

/// Asserts that the pins of `index` are two links running `role`'s programs, each named with
/// its role; returns `(link id, program id)` per hook.
fn assert_pinned_role(
    bed: &TestBed,
    node: usize,
    index: u32,
    role: IfaceRole,
) -> BTreeMap<TcHook, (u32, u32)> {
    let pinned = pinned_tc(bed, node, index);
    assert_eq!(pinned.len(), 2, "pins of ifindex {index}: {pinned:#?}");
    for (hook, l) in &pinned {
        assert_eq!(
            l.role.as_deref(),
            Some(role.name()),
            "role of {}: {l:#?}",
            hook.name()
        );
        assert_eq!(
            IfaceRole::of_program(&l.program),
            Some((role, *hook)),
            "program on {}: {l:#?}",
            hook.name()
        );
        assert_eq!(l.link_type, "tcx", "{l:#?}");
    }
    pinned
        .into_iter()
        .map(|(hook, l)| (hook, (l.link_id, l.program_id)))
        .collect()
}

/// Waits until `iface`'s hooks carry the programs of `role`, once each; returns them.
fn wait_role(
    agent: &Agent,
    node: &Node,
    iface: &str,
    role: IfaceRole,
) -> Vec<(TcHook, String, u32)> {
    let deadline = Instant::now() + FOLLOW_TIMEOUT;
    loop {
        let progs = tcx(node, iface).unwrap_or_else(|e| panic!("{e:#}"));
        if role_on_hooks(&progs) == Some(role) {
            return progs;
        }
        assert!(
            Instant::now() < deadline,
            "{iface} did not get the {role} programs within {FOLLOW_TIMEOUT:?}: {progs:?}\n\
             agent log:\n{}",
            agent.log()
        );
        std::thread::sleep(POLL);
    }
}

/// Waits until the agent logged a line holding every one of `words`; returns it.
fn wait_log(agent: &Agent, words: &[&str]) -> anyhow::Result<String> {
    let deadline = Instant::now() + FOLLOW_TIMEOUT;
    loop {
        if let Some(line) = agent
            .log()
            .lines()
            .find(|l| words.iter().all(|w| l.contains(w)))
        {
            return Ok(line.to_owned());
        }
        if Instant::now() >= deadline {
            bail!(
                "no log line with {words:?} within {FOLLOW_TIMEOUT:?}; log:\n{}",
                agent.log()
            );
        }
        std::thread::sleep(POLL);
    }
}

/// A TCP request from pod `client` to pod `server`'s own address (no Service: the packets
/// cross the client node's uplink out and the server node's uplink in).
fn pod_to_pod(bed: &TestBed, client: &str, server: &str) -> anyhow::Result<k8s::Answer> {
    let dst = SocketAddr::new(bed.pod(server).ipv4.into(), PORT);
    bed.pod(client)
        .ns
        .run(move || k8s::tcp_request(dst, "across the uplinks", REQUEST_TIMEOUT))
}

#[test]
fn node_facing_interfaces_get_the_world_programs_are_taken_over_and_change_roles() {
    let mut bed = TestBed::new(&[(0, "client"), (1, "server")]);
    let backends = Backends::new();
    let server = bed.pod("server");
    backends
        .serve(
            &server.ns,
            "server",
            SocketAddr::new(server.ipv4.into(), PORT),
        )
        .expect("serving on the server pod");
    bed.start_agents();
    let node1 = bed.topo.node(0).clone();
    let pod_if = bed.pod("client").host_ifname.clone();
    let (eth0, pod_index) = (ifindex(&node1, ETH0), ifindex(&node1, &pod_if));

    let before = each_interface_in_its_role(&bed, &node1, &pod_if, (eth0, pod_index));
    let after = taken_over_after_sigkill(&mut bed, &node1, &before, (eth0, pod_index));
    renamed_across_roles(&bed, &node1, eth0, &after);
    drop(backends);
    bed.finish();
}

/// Step 1: `eth0` is node-facing and the pod's veth pod-facing, on their hooks and in their
/// pins; traffic between the nodes crosses both uplinks. Returns `eth0`'s pinned links.
fn each_interface_in_its_role(
    bed: &TestBed,
    node1: &Node,
    pod_if: &str,
    (eth0, pod_index): (u32, u32),
) -> BTreeMap<TcHook, (u32, u32)> {
    // Each interface in its role, on the hooks and in the pins.
    let agent = bed.agent(0);
    let hooks = tcx(node1, ETH0).expect("querying eth0");
    assert_eq!(
        role_on_hooks(&hooks),
        Some(IfaceRole::NodeFacing),
        "{ETH0}: {hooks:?}"
    );
    let pod_hooks = tcx(node1, pod_if).expect("querying the pod's veth");
    assert_eq!(
        role_on_hooks(&pod_hooks),
        Some(IfaceRole::PodFacing),
        "{pod_if}: {pod_hooks:?}"
    );
    let before = assert_pinned_role(bed, 0, eth0, IfaceRole::NodeFacing);
    assert_pinned_role(bed, 0, pod_index, IfaceRole::PodFacing);
    let table = agent.inspect("links").expect("inspect links");
    for (pin, role) in [
        (format!("tc/{eth0}/ingress"), "node-facing"),
        (format!("tc/{pod_index}/egress"), "pod-facing"),
    ] {
        assert!(
            table
                .lines()
                .any(|l| l.starts_with(&format!("{pin} ")) && l.trim_end().ends_with(role)),
            "inspect links shows no {role} row for {pin}:\n{table}"
        );
    }
    for words in [
        ["node-facing interface: attached", "iface=eth0 "],
        [
            "pod-facing interface: attached",
            &format!("iface={pod_if} "),
        ],
    ] {
        wait_log(agent, &words).unwrap_or_else(|e| panic!("{e:#}"));
    }
    let answer = pod_to_pod(bed, "client", "server").unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(answer.label, "server");
    bed.step(&format!(
        "node1: {ETH0} (ifindex {eth0}) runs {PROG_TC_FROM_WORLD} / {PROG_TC_TO_WORLD} \
         (links {:?}), {pod_if} runs {PROG_TC_FROM_POD} / {PROG_TC_TO_POD}; a request \
         client -> server crossed both nodes' uplinks",
        before.values().map(|(link, _)| link).collect::<Vec<_>>()
    ));

    before
}

/// Step 2: node1's agent is killed with SIGKILL and started again: `eth0` keeps its links, which
/// run the new agent's programs. Returns `eth0`'s pinned links now.
fn taken_over_after_sigkill(
    bed: &mut TestBed,
    node1: &Node,
    before: &BTreeMap<TcHook, (u32, u32)>,
    (eth0, pod_index): (u32, u32),
) -> BTreeMap<TcHook, (u32, u32)> {
    // SIGKILL, then a new agent: the same links, this agent's programs.
    let hooks = tcx(node1, ETH0).expect("querying eth0");
    let killed = bed.agents.remove(0);
    let status = killed.kill().expect("killing node1's agent");
    let kept = tcx(node1, ETH0).expect("querying eth0");
    assert_eq!(kept, hooks, "{ETH0}'s hooks changed while no agent ran");
    pod_to_pod(bed, "client", "server").unwrap_or_else(|e| panic!("while no agent runs: {e:#}"));
    let agent = Agent::start(&bed.agent_bin, node1, bed.manifests.path())
        .unwrap_or_else(|e| panic!("restarting node1's agent: {e:#}"));
    bed.agents.insert(0, agent);
    let line = wait_log(
        bed.agent(0),
        &[
            "took over the pinned TC links",
            "iface=eth0 ",
            "role=node-facing",
        ],
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let after = assert_pinned_role(bed, 0, eth0, IfaceRole::NodeFacing);
    for hook in TcHook::ALL {
        let ((link_before, prog_before), (link_after, prog_after)) = (before[&hook], after[&hook]);
        assert_eq!(
            link_after,
            link_before,
            "{ETH0} {}: a new link instead of the pinned one taken over",
            hook.name()
        );
        assert_ne!(
            prog_after,
            prog_before,
            "{ETH0} {}: still the killed agent's program",
            hook.name()
        );
    }
    let now = wait_role(bed.agent(0), node1, ETH0, IfaceRole::NodeFacing);
    let ids: Vec<u32> = now.iter().map(|(_, _, id)| *id).collect();
    assert_eq!(
        ids,
        [after[&TcHook::Ingress].1, after[&TcHook::Egress].1],
        "{ETH0}'s hooks run other programs than its pins say: {now:?}"
    );
    assert_pinned_role(bed, 0, pod_index, IfaceRole::PodFacing);
    pod_to_pod(bed, "client", "server").unwrap_or_else(|e| panic!("after the restart: {e:#}"));
    bed.step(&format!(
        "node1's agent killed ({status}) and restarted: {ETH0}'s links {:?} kept, programs \
         {:?} -> {ids:?}; agent: {}",
        after.values().map(|(link, _)| link).collect::<Vec<_>>(),
        before.values().map(|(_, prog)| prog).collect::<Vec<_>>(),
        line.split_once("INFO ").map_or(line.as_str(), |(_, s)| s)
    ));

    after
}

/// Step 3: `eth0` renamed into the pod-facing patterns and back: its programs are swapped in
/// place both times (same links). Leaves `eth0` without its routes (they went with the link
/// down), so it comes last.
fn renamed_across_roles(
    bed: &TestBed,
    node1: &Node,
    eth0: u32,
    after: &BTreeMap<TcHook, (u32, u32)>,
) {
    // Renamed into the pod-facing patterns and back: the programs are swapped in place.
    let renamed = format!("{POD_IFNAME_PREFIX}90");
    node1
        .ns
        .ip_batch(&[
            format!("link set {ETH0} down"),
            format!("link set {ETH0} name {renamed}"),
        ])
        .expect("renaming eth0");
    wait_log(
        bed.agent(0),
        &[
            "changed role, node-facing to pod-facing",
            &format!("iface={renamed} "),
        ],
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    wait_role(bed.agent(0), node1, &renamed, IfaceRole::PodFacing);
    let as_pod = assert_pinned_role(bed, 0, eth0, IfaceRole::PodFacing);
    node1
        .ns
        .ip_batch(&[
            format!("link set {renamed} name {ETH0}"),
            format!("link set {ETH0} up"),
        ])
        .expect("renaming it back");
    wait_log(
        bed.agent(0),
        &["changed role, pod-facing to node-facing", "iface=eth0 "],
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    wait_role(bed.agent(0), node1, ETH0, IfaceRole::NodeFacing);
    let back = assert_pinned_role(bed, 0, eth0, IfaceRole::NodeFacing);
    for hook in TcHook::ALL {
        assert_eq!(
            (as_pod[&hook].0, back[&hook].0),
            (after[&hook].0, after[&hook].0),
            "{}: the role changes made new links",
            hook.name()
        );
    }
    assert_eq!(
        &back, after,
        "back in its role, eth0 runs this agent's world programs again"
    );
    bed.step(&format!(
        "{ETH0} renamed to {renamed}: {PROG_TC_FROM_POD} / {PROG_TC_TO_POD} on the same links; \
         renamed back: {PROG_TC_FROM_WORLD} / {PROG_TC_TO_WORLD} again"
    ));
}
