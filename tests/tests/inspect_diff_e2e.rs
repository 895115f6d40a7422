//! `svc-agent inspect diff --from-dir` against a real agent's pins, in both configurations the
//! suite runs (`SVC_TEST_SOCKET_LB`):
//!
//! - node1's agent programs `web` (`ClusterIP` and `NodePort`, endpoints web-0 on node1 and web-1
//!   on node2) and `api` (endpoint api-0): diff says no drift, exit 0, also with the agent
//!   stopped;
//! - with the agent stopped the directory is edited (web-1 leaves web's slice, `api` is
//!   removed, `new` is added): diff reports web's frontends `different` (web-1 an extra
//!   backend), `api`'s `extra` and `new`'s `missing`, exit 1, in JSON and as a table;
//! - the next agent programs the edit (no drift), is stopped, and web's `ClusterIP` frontend
//!   entry is removed from `SERVICES_V1` behind its back: diff reports it `missing`;
//! - a directory that does not exist: exit 2 with the reason;
//! - with the API server as the source (`--kubeconfig`, the test API server): no drift while
//!   an agent follows it; the agent stopped and an endpoint removed from the API: web's
//!   frontends `different`, exit 1.
//!
//! Needs root and the agent binary (`cargo build -p svc-agent`): fails, never skips, without
//! them.

use std::{net::SocketAddr, path::PathBuf, process::Command};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use svc_agent::inspect::diff::DiffRow;
use svc_common::service::{ServiceKey, ServiceValue};
use svc_tests::{
    apiserver::{ClusterApi, Options},
    k8s::{self, Agent, Backends, EndpointSlice, Protocol, Service},
    testbed::{TestBed, vip4},
};

const SERVICE_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
const NODE_PORT: u16 = 30185;

/// `svc-agent inspect diff` on node1's pins and `dir`, run in node1's network namespace (as on
/// a node: the node-facing interfaces' addresses serve node ports): exit code, stdout, stderr.
fn diff(bed: &TestBed, dir: &std::path::Path, format: &str) -> (i32, String, String) {
    diff_with(bed, "--from-dir", dir, format)
}

/// [`diff`] with the objects from `source` (`--from-dir` or `--kubeconfig`) at `path`.
fn diff_with(
    bed: &TestBed,
    source: &str,
    path: &std::path::Path,
    format: &str,
) -> (i32, String, String) {
    let node = bed.topo.node(0);
    let mut command = Command::new(&bed.agent_bin);
    command
        .arg("--bpffs")
        .arg(&node.bpffs)
        .args([
            "inspect",
            "diff",
            "--node-name",
            &node.name,
            "-o",
            format,
            source,
        ])
        .arg(path)
        .env("NO_COLOR", "1");
    let out = node
        .ns
        .run(move || Ok(command.output()?))
        .expect("running svc-agent inspect diff in node1's namespace");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn rows(bed: &TestBed, want_code: i32) -> Vec<DiffRow> {
    let (code, out, err) = diff(bed, bed.manifests.path(), "json");
    assert_eq!(code, want_code, "inspect diff: {out}\n{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("diff JSON: {e}\n{out}"))
}

/// The Services: web over `web_pods`, api (when `api`), new (when `new`).
fn write(bed: &TestBed, web_pods: &[&str], api: bool, new: bool) {
    let topo = &bed.topo;
    let web = Service::cluster_ip("web", &[vip4(175)])
        .port("http", Protocol::Tcp, SERVICE_PORT, BACKEND_PORT)
        .node_port(NODE_PORT);
    let mut docs = vec![
        web.to_yaml(),
        EndpointSlice::new("web", false)
            .ports_of(&web, &[])
            .ready_pods(topo, web_pods.iter().map(|p| bed.pod(p)))
            .to_yaml(),
    ];
    for (on, name, vip) in [(api, "api", vip4(176)), (new, "new", vip4(177))] {
        if !on {
            continue;
        }
        let svc = Service::cluster_ip(name, &[vip]).port(
            "http",
            Protocol::Tcp,
            SERVICE_PORT,
            BACKEND_PORT,
        );
        docs.push(svc.to_yaml());
        docs.push(
            EndpointSlice::new(name, false)
                .ports_of(&svc, &[])
                .ready_pods(topo, [bed.pod("api-0")])
                .to_yaml(),
        );
    }
    bed.manifests
        .write("svc.yaml", &k8s::documents(&docs))
        .unwrap_or_else(|e| panic!("writing svc.yaml: {e:#}"));
}

fn start(bed: &mut TestBed) {
    let agent = Agent::start(&bed.agent_bin, bed.topo.node(0), bed.manifests.path())
        .unwrap_or_else(|e| panic!("starting svc-agent on node1: {e:#}"));
    bed.agents.push(agent);
}

fn stop(bed: &mut TestBed) {
    let agent = bed.agents.pop().expect("a running agent");
    assert!(agent.stop().expect("stopping the agent").success());
}

/// The drift of each row, by Service name and scope.
fn summary(rows: &[DiffRow]) -> Vec<(String, String, String)> {
    rows.iter()
        .map(|r| {
            (
                r.name.clone().unwrap_or_default(),
                r.scope.clone(),
                r.drift.clone(),
            )
        })
        .collect()
}

/// Removes web's `ClusterIP` frontend entry (slot 0) from node1's pinned `SERVICES_V1`, as
/// something other than the agent would.
fn remove_web_clusterip(bed: &TestBed) {
    let pins = PathBuf::from(&bed.topo.node(0).bpffs).join("svc/v1/SERVICES_V1");
    let mut services: BpfHashMap<MapData, ServiceKey, ServiceValue> = BpfHashMap::try_from(
        Map::HashMap(MapData::from_pin(&pins).expect("opening SERVICES_V1")),
    )
    .expect("SERVICES_V1");
    let vip = match vip4(175) {
        std::net::IpAddr::V4(v4) => svc_common::addr::from_v4(v4.octets()),
        std::net::IpAddr::V6(_) => unreachable!("vip4 is IPv4"),
    };
    let key = ServiceKey {
        addr: vip,
        port: svc_common::Be16::from_host(SERVICE_PORT),
        slot: 0,
        proto: 6,
        family: svc_common::addr::FAMILY_V4,
        scope: svc_common::service::scope::INTERNAL,
        _pad: 0,
    };
    services
        .remove(&key)
        .expect("removing web's ClusterIP frontend");
}

#[test]
fn diff_says_what_the_maps_hold_against_the_directory() {
    let mut bed = TestBed::new(&[(0, "web-0"), (1, "web-1"), (0, "api-0")]);
    let backends = Backends::new();
    bed.serve_pods(&backends, &["web-0", "web-1", "api-0"], BACKEND_PORT);
    write(&bed, &["web-0", "web-1"], true, false);
    start(&mut bed);
    assert!(rows(&bed, 0).is_empty());
    let (code, table, _) = diff(&bed, bed.manifests.path(), "table");
    assert_eq!(code, 0);
    assert!(
        table.starts_with("no drift: the maps hold the 4 frontends"),
        "{table}"
    );
    stop(&mut bed);
    assert!(
        rows(&bed, 0).is_empty(),
        "the pins stay as the agent left them"
    );
    bed.step("agent running, then stopped: no drift, exit 0");

    write(&bed, &["web-0"], false, true);
    let drift = rows(&bed, 1);
    // web has a ClusterIP frontend and a NodePort of each scope (pods reach it too).
    assert_eq!(
        summary(&drift),
        [
            ("api".into(), "internal".into(), "extra".into()),
            ("new".into(), "internal".into(), "missing".into()),
            ("web".into(), "external".into(), "different".into()),
            ("web".into(), "internal".into(), "different".into()),
            ("web".into(), "internal".into(), "different".into()),
        ],
        "{drift:#?}"
    );
    let web1 = SocketAddr::new(bed.pod("web-1").ipv4.into(), BACKEND_PORT).to_string();
    let api0 = SocketAddr::new(bed.pod("api-0").ipv4.into(), BACKEND_PORT).to_string();
    for web in &drift[2..] {
        assert_eq!(web.extra_backends, std::slice::from_ref(&web1), "{web:#?}");
        assert!(
            web.missing_backends.is_empty() && web.fields.is_empty(),
            "{web:#?}"
        );
    }
    assert_eq!(drift[1].missing_backends, [api0]);
    assert_eq!(drift[1].frontend, format!("{}:{SERVICE_PORT}", vip4(177)));
    let (code, table, _) = diff(&bed, bed.manifests.path(), "table");
    assert_eq!(code, 1);
    assert!(
        table
            .trim_end()
            .ends_with("drift: 5 frontends of 3 Services"),
        "{table}"
    );
    bed.step(
        "directory edited behind the stopped agent: web different, api extra, new missing, exit 1",
    );

    start(&mut bed);
    assert!(
        rows(&bed, 0).is_empty(),
        "the next agent programmed the edit"
    );
    stop(&mut bed);
    remove_web_clusterip(&bed);
    let drift = rows(&bed, 1);
    assert_eq!(
        summary(&drift),
        [("web".into(), "internal".into(), "missing".into())],
        "{drift:#?}"
    );
    // Its slot (web-0's) stays behind, which no program reads now: stray.
    assert_eq!(drift[0].extra_backends, ["slot 1 (stray)"], "{drift:#?}");
    bed.step("web's frontend entry removed behind the agent's back: reported missing, exit 1");

    let (code, _, err) = diff(&bed, &bed.topo.run_dir().join("no-such-dir"), "json");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot list that directory"), "{err}");
    bed.step("a directory that does not exist: exit 2, said plainly");

    drop(backends);
    bed.finish();
}

#[test]
fn diff_compares_the_maps_with_the_api_server() {
    let mut bed = TestBed::new(&[(0, "web-0"), (1, "web-1")]);
    let api = ClusterApi::start(&bed.topo, Options::default()).expect("the test API server");
    let server = &api.server;
    let web = Service::cluster_ip("web", &[vip4(175)])
        .port("http", Protocol::Tcp, SERVICE_PORT, BACKEND_PORT)
        .node_port(NODE_PORT);
    let slice = |bed: &TestBed, pods: &[&str]| {
        EndpointSlice::new("web", false)
            .ports_of(&web, &[])
            .ready_pods(&bed.topo, pods.iter().map(|p| bed.pod(p)))
            .to_yaml()
    };
    server
        .apply_yaml(&k8s::documents(&[
            web.to_yaml(),
            slice(&bed, &["web-0", "web-1"]),
        ]))
        .expect("storing web");
    let kubeconfig = api.kubeconfig.clone();
    let agent = Agent::start_kube(&bed.agent_bin, bed.topo.node(0), &kubeconfig)
        .unwrap_or_else(|e| panic!("starting svc-agent on node1: {e:#}"));
    bed.agents.push(agent);
    let (code, out, err) = diff_with(&bed, "--kubeconfig", &kubeconfig, "json");
    assert_eq!(code, 0, "{out}\n{err}");
    bed.step("the agent follows the API server: inspect diff --kubeconfig says no drift");

    stop(&mut bed);
    server
        .apply_yaml(&slice(&bed, &["web-0"]))
        .expect("updating web's slice");
    let (code, out, err) = diff_with(&bed, "--kubeconfig", &kubeconfig, "json");
    assert_eq!(code, 1, "{out}\n{err}");
    let drift: Vec<DiffRow> =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("diff JSON: {e}\n{out}"));
    assert_eq!(
        summary(&drift),
        [
            ("web".into(), "external".into(), "different".into()),
            ("web".into(), "internal".into(), "different".into()),
            ("web".into(), "internal".into(), "different".into()),
        ],
        "{drift:#?}"
    );
    let web1 = SocketAddr::new(bed.pod("web-1").ipv4.into(), BACKEND_PORT).to_string();
    for row in &drift {
        assert_eq!(row.extra_backends, std::slice::from_ref(&web1), "{row:#?}");
    }
    bed.step("agent stopped, web-1 removed in the API: web's 3 frontends different, exit 1");
    bed.finish();
    drop(api);
}
