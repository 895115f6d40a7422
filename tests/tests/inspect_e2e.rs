//! `svc-agent inspect` against a running dataplane and a stopped one, in both configurations
//! the suite runs (`SVC_TEST_SOCKET_LB`):
//!
//! - three Services on node1's agent (standalone): `web` (port `http`, endpoints web-0 on
//!   node1 and web-1 on node2), `sticky` (port `api`, `ClientIP` affinity for 600 s) and
//!   `local` (UDP port `dns`, `internalTrafficPolicy: Local`, its endpoints on both nodes);
//!   real connections through `web` and `sticky`;
//! - `inspect services -o json` parses and names every frontend's Service and port (from the
//!   pinned `FRONTEND_NAMES_V1`) with its type, policy, affinity and backend states and Pods;
//!   the table and wide forms end with their count line; `inspect maps -o json` counts the
//!   names map's entries (3) and the kernel memory of every pinned map; `inspect ct --service`
//!   keeps only that Service's entries (per packet the connections left some), and a Service
//!   that does not exist keeps none;
//! - the agent stopped by SIGTERM (pins stay): the same names, counts and JSON;
//! - the next agent takes over, `sticky` is removed from the directory: its frontend and its
//!   names entry go (`FRONTEND_NAMES_V1` back to 2 entries);
//! - a bpffs with nothing pinned: `inspect` says so and exits 1.
//!
//! Needs root and the agent binary (`cargo build -p svc-agent`): fails, never skips, without
//! them.

use std::{
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use svc_agent::inspect::{ServiceRow, ct::CtRow, maps::MapRow};
use svc_tests::{
    k8s::{self, Agent, Backends, EndpointSlice, Protocol, Service},
    testbed::{TestBed, vip4},
};

const SERVICE_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
const IO_TIMEOUT: Duration = Duration::from_secs(2);
const REQUESTS: usize = 4;
const AFFINITY_S: u32 = 600;

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
    /// The Services (`sticky` only `with_sticky`), their slices over web-0 and web-1.
    fn write(&self, with_sticky: bool) {
        let topo = &self.bed.topo;
        let pods = || [self.pod("web-0"), self.pod("web-1")];
        let web = Service::cluster_ip("web", &[vip4(140)]).port(
            "http",
            Protocol::Tcp,
            SERVICE_PORT,
            BACKEND_PORT,
        );
        let sticky = Service::cluster_ip("sticky", &[vip4(141)]).port(
            "api",
            Protocol::Tcp,
            SERVICE_PORT,
            BACKEND_PORT,
        );
        let local = Service::cluster_ip("local", &[vip4(142)])
            .port("dns", Protocol::Udp, SERVICE_PORT, BACKEND_PORT)
            .internal_traffic_policy_local();
        let mut docs = Vec::new();
        for (svc, on) in [(&web, true), (&sticky, with_sticky), (&local, true)] {
            if !on {
                continue;
            }
            let mut yaml = svc.to_yaml();
            if svc.name == "sticky" {
                let none = "  sessionAffinity: None\n";
                assert!(yaml.contains(none), "unexpected Service YAML:\n{yaml}");
                yaml = yaml.replace(
                    none,
                    &format!(
                        "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      \
                         timeoutSeconds: {AFFINITY_S}\n"
                    ),
                );
            }
            docs.push(yaml);
            docs.push(
                EndpointSlice::new(&svc.name, false)
                    .ports_of(svc, &[])
                    .ready_pods(topo, pods())
                    .to_yaml(),
            );
        }
        self.bed
            .manifests
            .write("svc.yaml", &k8s::documents(&docs))
            .unwrap_or_else(|e| panic!("writing svc.yaml: {e:#}"));
    }

    fn start_agent(&mut self) {
        let agent = Agent::start(&self.agent_bin, self.topo.node(0), self.manifests.path())
            .unwrap_or_else(|e| panic!("starting svc-agent on node1: {e:#}"));
        self.bed.agents.push(agent);
    }

    fn bpffs(&self) -> std::path::PathBuf {
        self.agent(0).bpffs().to_owned()
    }

    /// `svc-agent inspect <args>` on node1's pins (stdout).
    fn inspect(&self, args: &[&str]) -> String {
        let args: Vec<&str> = ["inspect"].iter().chain(args).copied().collect();
        k8s::agent_command(&self.agent_bin, &self.bpffs(), &args)
            .unwrap_or_else(|e| panic!("{}: {e:#}", args.join(" ")))
    }

    fn services(&self) -> Vec<ServiceRow> {
        let text = self.inspect(&["services", "-o", "json"]);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("services JSON: {e}\n{text}"))
    }

    fn maps(&self) -> Vec<MapRow> {
        let text = self.inspect(&["maps", "-o", "json"]);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("maps JSON: {e}\n{text}"))
    }

    fn ct(&self, filters: &[&str]) -> Vec<CtRow> {
        let mut args = vec!["ct", "-o", "json"];
        args.extend(filters);
        let text = self.inspect(&args);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("ct JSON: {e}\n{text}"))
    }

    fn map(&self, name: &str) -> MapRow {
        self.maps()
            .into_iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no map {name}"))
    }
}

/// Each row's Service, port name and frontend, in the order `inspect` sorted them.
fn names(rows: &[ServiceRow]) -> Vec<(String, String, String)> {
    rows.iter()
        .map(|r| {
            (
                format!(
                    "{}/{}",
                    r.namespace.as_deref().unwrap_or("?"),
                    r.name.as_deref().unwrap_or("?")
                ),
                r.port_name.clone().unwrap_or_else(|| "?".to_owned()),
                format!("{} {}", r.frontend, r.protocol),
            )
        })
        .collect()
}

/// What `inspect services` must say about the three Services (with `sticky`) or two.
fn check_services(c: &Cluster, with_sticky: bool) -> Vec<ServiceRow> {
    let rows = c.services();
    let mut want = vec![
        (
            "default/local".to_owned(),
            "dns".to_owned(),
            format!("{}:{SERVICE_PORT} UDP", vip4(142)),
        ),
        (
            "default/sticky".to_owned(),
            "api".to_owned(),
            format!("{}:{SERVICE_PORT} TCP", vip4(141)),
        ),
        (
            "default/web".to_owned(),
            "http".to_owned(),
            format!("{}:{SERVICE_PORT} TCP", vip4(140)),
        ),
    ];
    if !with_sticky {
        want.remove(1);
    }
    assert_eq!(names(&rows), want, "{rows:#?}");
    let web0 = SocketAddr::new(c.pod_ip("web-0", vip4(140)), BACKEND_PORT).to_string();
    let web1 = SocketAddr::new(c.pod_ip("web-1", vip4(140)), BACKEND_PORT).to_string();
    for r in &rows {
        assert_eq!(
            (r.kind.as_str(), r.scope.as_str()),
            ("ClusterIP", "internal")
        );
        assert_eq!(r.when_empty, "serve", "{r:?}");
        let name = r.name.as_deref().unwrap();
        let want_affinity = if name == "sticky" { AFFINITY_S } else { 0 };
        assert_eq!(r.affinity_timeout_seconds, want_affinity, "{r:?}");
        assert_eq!(
            r.session_affinity,
            if want_affinity == 0 {
                "None"
            } else {
                "ClientIP"
            }
        );
        let (policy, endpoints) = if name == "local" {
            // Local: only the endpoint on this node (web-0 is on node1).
            ("Local", vec![(web0.as_str(), "default/web-0", true)])
        } else {
            (
                "Cluster",
                vec![
                    (web0.as_str(), "default/web-0", true),
                    (web1.as_str(), "default/web-1", false),
                ],
            )
        };
        assert_eq!(r.internal_traffic_policy, policy, "{r:?}");
        let mut got: Vec<(&str, &str, bool)> = r
            .backends
            .iter()
            .map(|b| {
                (
                    b.endpoint.as_str(),
                    b.pod.as_deref().unwrap_or("?"),
                    b.local,
                )
            })
            .collect();
        got.sort_unstable();
        assert_eq!(got, endpoints, "{r:?}");
        assert!(r.backends.iter().all(|b| b.state == "ready"), "{r:?}");
    }
    // The table and wide forms: aligned rows under a header, the count line last.
    let n = want.len();
    let slots = if with_sticky { 5 } else { 3 };
    for form in ["table", "wide"] {
        let text = c.inspect(&["services", "-o", form]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), n + 2, "{text}");
        assert!(lines[0].starts_with("NAMESPACE  NAME"), "{text}");
        assert_eq!(
            lines[n + 1],
            format!("{n} frontends of {n} Services, {slots} backend slots"),
            "{text}"
        );
        if form == "wide" {
            assert!(
                text.contains(&format!("{web0}=default/web-0(local,id ")),
                "{text}"
            );
        }
    }
    rows
}

/// `inspect maps`: every map pinned with its memory; `FRONTEND_NAMES_V1` holds `frontends`.
fn check_maps(c: &Cluster, frontends: u64) {
    let maps = c.maps();
    assert_eq!(maps.len(), svc_common::MAP_NAMES.len());
    for m in &maps {
        assert!(m.pinned, "{m:?}");
        // An LPM trie's memory follows its entries: an empty one (no source ranges) has none.
        let empty_trie = m.kind == "lpm_trie" && m.entries == 0;
        assert!(m.memlock_bytes > 0 || empty_trie, "{m:?}");
        assert!(m.max_entries > 0 && m.fill_ratio <= 1.0, "{m:?}");
    }
    let names = c.map("FRONTEND_NAMES_V1");
    assert_eq!(
        (names.entries, names.counted.as_str()),
        (frontends, "counted")
    );
    assert_eq!((names.key_size, names.value_size), (4, 192));
    let services = c.map("SERVICES_V1");
    let slots = if frontends == 3 { 5 } else { 3 };
    assert_eq!(services.entries, frontends + slots, "{services:?}");
    let text = c.inspect(&["maps"]);
    assert!(
        text.lines().last().is_some_and(
            |l| l.starts_with(&format!("{} maps pinned, ", svc_common::MAP_NAMES.len()))
        ),
        "{text}"
    );
}

/// `inspect ct --service`: only that Service's entries; per packet the connections through
/// `web` left some (at the socket no conntrack entry is made for them).
fn check_ct(c: &Cluster) {
    let all = c.ct(&[]);
    let web = c.ct(&["--service", "default/web"]);
    assert!(
        web.iter()
            .all(|r| r.service.as_deref() == Some("default/web")
                && r.port_name.as_deref() == Some("http")),
        "{web:#?}"
    );
    assert!(c.ct(&["--service", "default/nope"]).is_empty());
    assert!(
        c.ct(&["--service", "default/web", "--proto", "udp"])
            .is_empty()
    );
    let vip = vip4(140).to_string();
    let by_addr = c.ct(&["--addr", &vip, "--port", "80", "--proto", "tcp"]);
    assert!(by_addr.iter().all(|r| r.protocol == "TCP"), "{by_addr:#?}");
    if !k8s::pods_at_socket() {
        assert!(
            !web.is_empty(),
            "per packet, the connections through web are tracked"
        );
        assert!(!by_addr.is_empty());
    }
    c.step(&format!(
        "inspect ct: {} entries, {} of default/web, {} naming {vip}:80/TCP",
        all.len(),
        web.len(),
        by_addr.len()
    ));
}

/// Connections through `web` and `sticky` from the client pod; `sticky`'s all land on one
/// backend.
fn traffic(c: &Cluster) {
    let client = c.pod("client").ns.clone();
    for (vip, name) in [(vip4(140), "web"), (vip4(141), "sticky")] {
        let addr = SocketAddr::new(vip, SERVICE_PORT);
        let answers = client
            .run(move || {
                (0..REQUESTS)
                    .map(|i| Ok(k8s::tcp_request(addr, &format!("{name}-{i}"), IO_TIMEOUT)?.label))
                    .collect::<anyhow::Result<Vec<String>>>()
            })
            .unwrap_or_else(|e| panic!("requests to {addr}: {e:#}{}", c.diag()));
        if name == "sticky" {
            assert!(
                answers.iter().all(|a| *a == answers[0]),
                "affinity: {answers:?}"
            );
        }
        c.step(&format!(
            "{REQUESTS} connections to {name} ({addr}): {answers:?}"
        ));
    }
}

#[test]
fn inspect_names_services_from_pinned_state_with_the_agent_running_and_stopped() {
    let mut c = Cluster {
        backends: Backends::new(),
        bed: TestBed::new(&[(0, "client"), (0, "web-0"), (1, "web-1")]),
    };
    c.write(true);
    c.serve_pods(&c.backends, &["web-0", "web-1"], BACKEND_PORT);
    c.start_agent();
    traffic(&c);
    let running = check_services(&c, true);
    check_maps(&c, 3);
    check_ct(&c);
    let web = running
        .iter()
        .find(|r| r.name.as_deref() == Some("web"))
        .unwrap();
    if !k8s::pods_at_socket() {
        assert!(web.packets > 0, "per packet, web's counters: {web:?}");
    }
    c.step("agent running: inspect services/maps/ct name every Service and port, JSON parses");

    // SIGTERM: the pins stay, and so do the names.
    let agent = c.bed.agents.pop().unwrap();
    let bpffs = agent.bpffs().to_owned();
    let status = agent.stop().expect("stopping the agent");
    assert!(status.success(), "{status}");
    let stopped_services = {
        let text = k8s::agent_command(&c.agent_bin, &bpffs, &["inspect", "services", "-o", "json"])
            .unwrap_or_else(|e| panic!("inspect with the agent stopped: {e:#}"));
        serde_json::from_str::<Vec<ServiceRow>>(&text).expect("JSON")
    };
    assert_eq!(names(&stopped_services), names(&running));
    let maps: Vec<MapRow> = serde_json::from_str(
        &k8s::agent_command(&c.agent_bin, &bpffs, &["inspect", "maps", "-o", "json"]).unwrap(),
    )
    .unwrap();
    let names_map = maps.iter().find(|m| m.name == "FRONTEND_NAMES_V1").unwrap();
    assert_eq!(names_map.entries, 3);
    c.step("agent stopped (SIGTERM): inspect still names the 3 Services from the pins");

    // The next agent takes over; sticky goes: its frontend and its name with it.
    c.start_agent();
    assert_eq!(
        names(&c.services()),
        names(&running),
        "the take-over keeps the names"
    );
    c.write(false);
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.services().len() != 2 {
        assert!(Instant::now() < deadline, "sticky not removed{}", c.diag());
        std::thread::sleep(Duration::from_millis(50));
    }
    check_services(&c, false);
    check_maps(&c, 2);
    c.step("sticky removed: its frontend and its FRONTEND_NAMES_V1 entry are gone");

    // Nothing pinned: said plainly, exit 1.
    let empty = c.topo.run_dir().join("empty-bpffs");
    std::fs::create_dir_all(&empty).unwrap();
    let out = Command::new(&c.agent_bin)
        .arg("--bpffs")
        .arg(&empty)
        .args(["inspect", "services"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("nothing is pinned at"), "{stderr}");
    c.step("an empty bpffs: inspect says nothing is pinned, exit 1");

    let Cluster { backends, bed } = c;
    drop(backends);
    bed.finish();
}
