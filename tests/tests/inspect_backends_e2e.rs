//! `svc-agent inspect backends` and `inspect affinity` against a running dataplane and a stopped
//! one, in both configurations the suite runs (`SVC_TEST_SOCKET_LB`):
//!
//! - one Service on node1's agent (standalone): `sticky` (port `api`, `ClientIP` affinity for
//!   600 s) over web-0 (node1) and web-1 (node2); real connections from the client pod, all
//!   answered by one backend;
//! - `inspect backends -o json` lists both backends, sorted by address, with their Pods, the
//!   Service, one slot each, `local` on web-0 only; per packet (`host-only`) the one that
//!   answered has counted packets (connect-time translation, `all`, counts none);
//! - `inspect affinity -o json` holds the client's entry (its address per packet, its network
//!   namespace's cookie at the socket) for `sticky`'s frontend, to the backend that answered,
//!   honoured;
//! - the agent stopped by SIGTERM (pins stay): the same rows;
//! - a bpffs with nothing pinned: both say so and exit 1.
//!
//! Needs root and the agent binary (`cargo build -p svc-agent`): fails, never skips, without
//! them.

use std::{net::SocketAddr, process::Command, time::Duration};

use svc_agent::inspect::{affinity::AffinityRow, backends::BackendsRow};
use svc_tests::{
    k8s::{self, Agent, Backends, EndpointSlice, Protocol, Service},
    testbed::{TestBed, vip4},
};

const SERVICE_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
const IO_TIMEOUT: Duration = Duration::from_secs(2);
const REQUESTS: usize = 4;
const AFFINITY_S: u32 = 600;

/// `svc-agent inspect <args>` on `bed`'s node1 pins (stdout).
fn inspect(bed: &TestBed, bpffs: &std::path::Path, args: &[&str]) -> String {
    let args: Vec<&str> = ["inspect"].iter().chain(args).copied().collect();
    k8s::agent_command(&bed.agent_bin, bpffs, &args)
        .unwrap_or_else(|e| panic!("{}: {e:#}", args.join(" ")))
}

fn backends(bed: &TestBed, bpffs: &std::path::Path) -> Vec<BackendsRow> {
    let text = inspect(bed, bpffs, &["backends", "-o", "json"]);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("backends JSON: {e}\n{text}"))
}

fn affinity(bed: &TestBed, bpffs: &std::path::Path) -> Vec<AffinityRow> {
    let text = inspect(bed, bpffs, &["affinity", "-o", "json"]);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("affinity JSON: {e}\n{text}"))
}

/// The Service `sticky` (`ClientIP`, [`AFFINITY_S`]) and its slice over web-0 and web-1.
fn write_manifests(bed: &TestBed) {
    let svc = Service::cluster_ip("sticky", &[vip4(141)]).port(
        "api",
        Protocol::Tcp,
        SERVICE_PORT,
        BACKEND_PORT,
    );
    let mut yaml = svc.to_yaml();
    let none = "  sessionAffinity: None\n";
    assert!(yaml.contains(none), "unexpected Service YAML:\n{yaml}");
    yaml = yaml.replace(
        none,
        &format!(
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      \
             timeoutSeconds: {AFFINITY_S}\n"
        ),
    );
    let slice = EndpointSlice::new(&svc.name, false)
        .ports_of(&svc, &[])
        .ready_pods(&bed.topo, [bed.pod("web-0"), bed.pod("web-1")])
        .to_yaml();
    bed.manifests
        .write("svc.yaml", &k8s::documents(&[yaml, slice]))
        .unwrap_or_else(|e| panic!("writing svc.yaml: {e:#}"));
}

/// What `inspect backends` must say: web-0 and web-1 with their Pods, `sticky`, one slot
/// each; per packet, the one that answered (`answered`) counted packets.
fn check_backends(bed: &TestBed, rows: &[BackendsRow], answered: &str) {
    let endpoint = |pod: &str| SocketAddr::new(bed.pod_ip(pod, vip4(141)), BACKEND_PORT);
    let mut want: Vec<(SocketAddr, &str, bool)> = vec![
        (endpoint("web-0"), "default/web-0", true),
        (endpoint("web-1"), "default/web-1", false),
    ];
    want.sort_unstable();
    let got: Vec<(SocketAddr, &str, bool)> = rows
        .iter()
        .map(|r| {
            (
                SocketAddr::new(r.address, r.port),
                r.pod.as_deref().unwrap_or("?"),
                r.flags.iter().any(|f| f == "local"),
            )
        })
        .collect();
    assert_eq!(got, want, "sorted by address, with Pods: {rows:#?}");
    for r in rows {
        assert_eq!(r.endpoint, SocketAddr::new(r.address, r.port).to_string());
        assert_eq!(r.services, ["default/sticky"], "{r:?}");
        assert_eq!((r.slots, r.frontend_ids.len()), (1, 1), "{r:?}");
        assert!(!r.flags.iter().any(|f| f == "terminating"), "{r:?}");
    }
    if !k8s::pods_at_socket() {
        let pod = format!("default/{answered}");
        let hit = rows
            .iter()
            .find(|r| r.pod.as_deref() == Some(&pod))
            .unwrap();
        assert!(
            hit.packets > 0 && hit.bytes > 0,
            "per packet, {pod}: {hit:?}"
        );
    }
}

/// What `inspect affinity` must say: the client's entry for `sticky` goes to the backend that
/// answered, honoured. Returns that row.
fn check_affinity(bed: &TestBed, rows: &[AffinityRow], answered: &str) -> AffinityRow {
    let client = bed.pod("client");
    let (text, address, netns) = if k8s::pods_at_socket() {
        let cookie = client
            .ns
            .run(svc_agent::loader::own_netns_cookie)
            .unwrap_or_else(|e| panic!("{e:#}"));
        (format!("netns:{cookie}"), None, Some(cookie))
    } else {
        let a = bed.pod_ip("client", vip4(141));
        (a.to_string(), Some(a), None)
    };
    let mine: Vec<&AffinityRow> = rows.iter().filter(|r| r.client == text).collect();
    assert_eq!(mine.len(), 1, "one entry of client {text}: {rows:#?}");
    let r = mine[0].clone();
    assert_eq!(
        (r.client_address, r.client_netns),
        (address, netns),
        "{r:?}"
    );
    assert_eq!(
        r.frontend.as_deref(),
        Some(format!("{}:{SERVICE_PORT}/TCP", vip4(141)).as_str())
    );
    assert_eq!(
        (r.service.as_deref(), r.port_name.as_deref()),
        (Some("default/sticky"), Some("api"))
    );
    let endpoint = SocketAddr::new(bed.pod_ip(answered, vip4(141)), BACKEND_PORT).to_string();
    assert_eq!(r.backend.as_deref(), Some(endpoint.as_str()), "{r:?}");
    assert_eq!(r.pod, Some(format!("default/{answered}")));
    assert_eq!(r.timeout_seconds, AFFINITY_S);
    assert!(r.idle_seconds < u64::from(AFFINITY_S), "{r:?}");
    assert!(r.honoured && r.reason.is_none(), "{r:?}");
    r
}

#[test]
fn inspect_backends_and_affinity_show_what_a_real_connection_left() {
    let mut bed = TestBed::new(&[(0, "client"), (0, "web-0"), (1, "web-1")]);
    let servers = Backends::new();
    write_manifests(&bed);
    bed.serve_pods(&servers, &["web-0", "web-1"], BACKEND_PORT);
    let agent = Agent::start(&bed.agent_bin, bed.topo.node(0), bed.manifests.path())
        .unwrap_or_else(|e| panic!("starting svc-agent on node1: {e:#}"));
    bed.agents.push(agent);
    let bpffs = bed.agent(0).bpffs().to_owned();

    // Before any connection: both backends, no affinity entry of the client.
    let before = backends(&bed, &bpffs);
    assert_eq!(before.len(), 2, "{before:#?}");
    let addr = SocketAddr::new(vip4(141), SERVICE_PORT);
    let answers = bed
        .pod("client")
        .ns
        .run(move || {
            (0..REQUESTS)
                .map(|i| Ok(k8s::tcp_request(addr, &format!("sticky-{i}"), IO_TIMEOUT)?.label))
                .collect::<anyhow::Result<Vec<String>>>()
        })
        .unwrap_or_else(|e| panic!("requests to {addr}: {e:#}{}", bed.diag()));
    assert!(
        answers.iter().all(|a| *a == answers[0]),
        "affinity: {answers:?}"
    );
    let answered = answers[0].clone();
    bed.step(&format!(
        "{REQUESTS} connections to sticky ({addr}), all answered by {answered}"
    ));

    let running_backends = backends(&bed, &bpffs);
    check_backends(&bed, &running_backends, &answered);
    let running_affinity = check_affinity(&bed, &affinity(&bed, &bpffs), &answered);
    for (what, header, count) in [
        ("backends", "ENDPOINT", "2 backends"),
        ("affinity", "CLIENT", "AFFINITY_V1: "),
    ] {
        for form in ["table", "wide"] {
            let text = inspect(&bed, &bpffs, &[what, "-o", form]);
            assert!(text.starts_with(header), "{text}");
            assert!(
                text.lines().last().is_some_and(|l| l.starts_with(count)),
                "{text}"
            );
        }
    }
    let filtered: Vec<BackendsRow> = serde_json::from_str(&inspect(
        &bed,
        &bpffs,
        &["backends", "-o", "json", "--service", "default/nope"],
    ))
    .unwrap();
    assert!(filtered.is_empty(), "{filtered:#?}");
    bed.step(&format!(
        "agent running: inspect backends names both Pods and sticky; inspect affinity: {} -> {} \
         ({}), honoured",
        running_affinity.client,
        running_affinity.backend.as_deref().unwrap_or("?"),
        answered
    ));

    // SIGTERM: the pins stay, and so do the rows (no traffic meanwhile: same counters).
    let agent = bed.agents.pop().unwrap();
    let status = agent.stop().expect("stopping the agent");
    assert!(status.success(), "{status}");
    assert_eq!(backends(&bed, &bpffs), running_backends);
    let stopped = check_affinity(&bed, &affinity(&bed, &bpffs), &answered);
    assert_eq!(
        AffinityRow {
            idle_seconds: 0,
            ..stopped
        },
        AffinityRow {
            idle_seconds: 0,
            ..running_affinity
        }
    );
    bed.step("agent stopped (SIGTERM): the same backends and the same honoured entry");

    // Nothing pinned: said plainly, exit 1.
    let empty = bed.topo.run_dir().join("empty-bpffs");
    std::fs::create_dir_all(&empty).unwrap();
    for what in ["backends", "affinity"] {
        let out = Command::new(&bed.agent_bin)
            .arg("--bpffs")
            .arg(&empty)
            .args(["inspect", what])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("nothing is pinned at"), "{stderr}");
    }
    bed.step("an empty bpffs: inspect backends/affinity say nothing is pinned, exit 1");

    drop(servers);
    bed.finish();
}
