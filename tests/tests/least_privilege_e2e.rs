//! The agent as the `DaemonSet` runs it: uid 0 with only the capabilities of
//! `manifests/deploy/daemonset.yaml` (read from the file, so manifest and test cannot
//! diverge) and no way to gain others (`setpriv`: bounding set, no inheritable or ambient
//! capabilities, `no_new_privs` as `allowPrivilegeEscalation: false`). Two emulated nodes, an
//! agent on each started that way, a `ClusterIP` Service whose one backend is on node2 and a
//! client pod on node1: the agents program their maps and the client's connections reach the
//! backend; node1's agent is then restarted and takes over its pinned links (which needs
//! `CAP_SYS_ADMIN`: the programs on a TCX hook are opened by id), and traffic still flows.
//! With `CAP_SYS_ADMIN` removed from the set the agent refuses to start, naming it, before it
//! pins anything.
//!
//! Every test builds its own topology and removes it at the end; every wait is bounded. Needs
//! root, `setpriv` (util-linux) and a built agent (`cargo build -p svc-agent`): fails, never
//! skips, without them.

use std::{
    ffi::{OsStr, OsString},
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use k8s_openapi::api::apps::v1::DaemonSet;
use serde_json::Value;
use svc_agent::caps::{self, Cap};
use svc_tests::{
    k8s::{self, Agent, EndpointSlice, Protocol, Service, frontend_key},
    testbed::{TestBed, vip4, vip6},
};

const DAEMONSET: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../manifests/deploy/daemonset.yaml"
);
/// Bound on every connect, read and write.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Requests per address family after each start.
const REQUESTS: usize = 10;
const SERVICE_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;

/// The capabilities the `DaemonSet` adds to the agent's container, which drops every other.
fn daemonset_capabilities() -> Vec<Cap> {
    let text = std::fs::read_to_string(DAEMONSET).expect("reading the DaemonSet");
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).expect("the DaemonSet is YAML");
    let doc = docs
        .into_iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    let ds: DaemonSet = serde_json::from_value(doc).expect("an apps/v1 DaemonSet");
    let pod = ds.spec.expect("spec").template.spec.expect("pod spec");
    let container = pod
        .containers
        .iter()
        .find(|c| c.name == "svc-agent")
        .expect("the svc-agent container");
    let capabilities = container
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .expect("the container's capabilities");
    assert_eq!(
        capabilities.drop.as_deref(),
        Some(&["ALL".to_owned()][..]),
        "the DaemonSet drops every capability it does not add"
    );
    capabilities
        .add
        .iter()
        .flatten()
        .map(|name| Cap::from_name(name).unwrap_or_else(|| panic!("{name}: no capability")))
        .collect()
}

fn mask(caps: &[Cap]) -> u64 {
    caps.iter().fold(0, |m, c| m | c.bit())
}

/// `setpriv` arguments that exec the agent as uid 0 with exactly `caps` (effective, permitted
/// and bounding), no inheritable or ambient ones, and `no_new_privs`.
fn launcher(caps: &[Cap]) -> Vec<OsString> {
    let bounding: Vec<String> = caps
        .iter()
        .map(|c| format!("+{}", c.name().to_ascii_lowercase()))
        .collect();
    [
        "setpriv".to_owned(),
        "--inh-caps=-all".to_owned(),
        "--ambient-caps=-all".to_owned(),
        format!("--bounding-set=-all,{}", bounding.join(",")),
        "--no-new-privs".to_owned(),
        "--".to_owned(),
    ]
    .map(OsString::from)
    .to_vec()
}

/// Asserts that process `pid` holds exactly `caps` and can never gain another.
fn assert_holds_exactly(pid: u32, caps: &[Cap], who: &str) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("{who}: /proc/{pid}/status: {e}"));
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("svc-agent"),
        "{who}: {pid} is not the agent (the launcher execs it)"
    );
    let field = |name: &str| {
        caps::status_mask(&status, name).unwrap_or_else(|| panic!("{who}: no {name}:\n{status}"))
    };
    let want = mask(caps);
    for (name, expected) in [
        ("CapEff", want),
        ("CapPrm", want),
        ("CapBnd", want),
        ("CapInh", 0),
        ("CapAmb", 0),
    ] {
        let got = field(name);
        assert_eq!(
            got,
            expected,
            "{who}: {name} holds {:?}, want {:?}",
            caps::in_mask(got),
            caps::in_mask(expected)
        );
    }
    let line = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(line("NoNewPrivs:"), "1", "{who}: no_new_privs");
    assert!(
        line("Uid:").starts_with("0\t"),
        "{who}: uid {}",
        line("Uid:")
    );
}

/// `REQUESTS` TCP requests from the client pod to each VIP: all answered by `web`, which saw
/// the client's own address.
fn requests_reach_the_backend(bed: &TestBed, vips: &[IpAddr], tag: &str) {
    let client = bed.pod("client");
    for &vip in vips {
        let dst = SocketAddr::new(vip, SERVICE_PORT);
        let client_ip = bed.pod_ip("client", vip);
        client
            .ns
            .run(|| {
                for i in 0..REQUESTS {
                    let request = format!("{tag}-{i}");
                    let answer = k8s::tcp_request(dst, &request, IO_TIMEOUT)?;
                    anyhow::ensure!(
                        answer.label == "web" && answer.from == dst,
                        "{request}: answered by {} from {}",
                        answer.label,
                        answer.from
                    );
                    anyhow::ensure!(
                        answer.client_seen == client_ip,
                        "{request}: web saw {}, not {client_ip}",
                        answer.client_seen
                    );
                }
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{e:#}{}", bed.diag()));
    }
    bed.step(&format!(
        "{tag}: {} TCP requests from client (node1) through {vips:?} answered by web (node2)",
        REQUESTS * vips.len()
    ));
}

#[test]
fn the_daemonsets_capabilities_run_the_agent_and_serve_a_cluster_ip() {
    let granted = daemonset_capabilities();
    caps::check(mask(&granted), true).expect("the DaemonSet grants what the agent checks for");
    let launcher = launcher(&granted);
    let launcher: Vec<&OsStr> = launcher.iter().map(OsString::as_os_str).collect();
    let mut bed = TestBed::new(&[(0, "client"), (1, "web")]);
    let (v4, v6) = (vip4(40), vip6(40));
    let svc = Service::cluster_ip("web", &[v4, v6]).port(
        "http",
        Protocol::Tcp,
        SERVICE_PORT,
        BACKEND_PORT,
    );
    let mut docs = vec![svc.to_yaml()];
    for vip in [v4, v6] {
        docs.push(
            EndpointSlice::new("web", vip.is_ipv6())
                .ports_of(&svc, &[])
                .ready_pods(&bed.topo, [bed.pod("web")])
                .to_yaml(),
        );
    }
    bed.manifests
        .write("web.yaml", &k8s::documents(&docs))
        .expect("writing the Service");
    let backends = k8s::Backends::new();
    let web = bed.pod("web");
    for ip in [IpAddr::from(web.ipv4), web.ipv6.into()] {
        backends
            .serve(&web.ns, "web", SocketAddr::new(ip, BACKEND_PORT))
            .expect("serving web");
    }
    bed.start_agents_under(&launcher);
    for (node, agent) in bed.agents.iter().enumerate() {
        assert_holds_exactly(agent.pid(), &granted, &format!("node{}'s agent", node + 1));
    }
    bed.step(&format!(
        "both agents hold exactly {:?} (effective, permitted, bounding), none inheritable or \
         ambient, no_new_privs",
        granted.iter().map(ToString::to_string).collect::<Vec<_>>()
    ));
    let want_backend =
        |vip: IpAddr| SocketAddr::new(bed.pod_ip("web", vip), BACKEND_PORT).to_string();
    for node in 0..2 {
        let programmed = bed.programmed(node);
        for vip in [v4, v6] {
            let key = frontend_key(SocketAddr::new(vip, SERVICE_PORT), Protocol::Tcp);
            assert_eq!(
                programmed.backends(&key),
                Some([want_backend(vip)].into()),
                "node{} {key}:\n{}",
                node + 1,
                programmed.text
            );
        }
    }
    bed.step("both agents programmed web's two frontends");
    requests_reach_the_backend(&bed, &[v4, v6], "first");

    // A restart under the same capabilities takes over the pinned links (the programs on
    // each TCX hook are opened by id: CAP_SYS_ADMIN) without a warning.
    let old = bed.agents.remove(0);
    let (status, log) = old.stop_with_log().expect("stopping node1's agent");
    assert!(
        status.success(),
        "node1's agent ended with {status}:\n{log}"
    );
    let node1 = &bed.topo.nodes()[0];
    let again = Agent::start_under(&launcher, &bed.agent_bin, node1, bed.manifests.path())
        .unwrap_or_else(|e| panic!("restarting node1's agent: {e:#}"));
    assert_holds_exactly(again.pid(), &granted, "node1's restarted agent");
    let log = again.log();
    let took_over = log
        .matches("took over the pinned TC links of an earlier agent")
        .count();
    // The client pod's interface and the node's uplink.
    assert!(
        took_over >= 2,
        "node1's restarted agent took over {took_over} interfaces' links:\n{log}"
    );
    bed.agents.insert(0, again);
    bed.step(&format!(
        "node1's agent restarted under the same capabilities: took over the pinned TC links \
         of {took_over} interfaces (BPF_LINK_UPDATE)"
    ));
    requests_reach_the_backend(&bed, &[v4, v6], "after-restart");
    drop(backends);
    bed.finish();
}

#[test]
fn without_cap_sys_admin_the_agent_refuses_to_start_and_names_it() {
    let mut granted = daemonset_capabilities();
    assert!(
        granted.contains(&Cap::SYS_ADMIN),
        "the DaemonSet grants CAP_SYS_ADMIN"
    );
    granted.retain(|c| *c != Cap::SYS_ADMIN);
    let launcher = launcher(&granted);
    let launcher: Vec<&OsStr> = launcher.iter().map(OsString::as_os_str).collect();
    let bed = TestBed::new(&[]);
    let node = &bed.topo.nodes()[0];
    let err = Agent::start_under(&launcher, &bed.agent_bin, node, bed.manifests.path())
        .map(|agent| {
            let log = agent.log();
            let _ = agent.stop();
            log
        })
        .expect_err("an agent without CAP_SYS_ADMIN started");
    let err = format!("{err:#}");
    assert!(err.contains("exited (exit status: 1)"), "{err}");
    assert!(
        err.contains(
            "svc-agent run lacks CAP_SYS_ADMIN (taking over pinned TCX links \
             (BPF_PROG_GET_FD_BY_ID) and entering pods' network namespaces (setns)"
        ),
        "{err}"
    );
    assert!(
        err.contains("its effective capabilities are CAP_NET_ADMIN, CAP_PERFMON, CAP_BPF"),
        "{err}"
    );
    // Refused before anything touched the bpffs (the pin directory's lock comes later).
    assert!(
        !Path::new(&node.bpffs).join("svc").exists(),
        "the refused agent created {}/svc",
        node.bpffs.display()
    );
    bed.step("without CAP_SYS_ADMIN: refused at start, naming it, nothing pinned");
    bed.finish();
}
