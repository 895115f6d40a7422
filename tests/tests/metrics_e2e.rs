//! The agent's `/metrics`, `/healthz` and `/livez` against a running dataplane, scraped from
//! inside the node's network namespace, in both configurations the suite runs
//! (`SVC_TEST_SOCKET_LB`):
//!
//! - after the first sync: `/healthz` 200 (`nodeEligible`), the pass histogram counted it,
//!   the frontends are programmed and `SERVICES_V1` / `BACKENDS_V1` are filled above 0;
//! - real traffic through a `ClusterIP`: the translation counter of this configuration
//!   (`sock_xlate` at the socket, `dnat` per packet) grew by what the traffic asks (exactly one
//!   per connection at the socket, at least three packets per connection per packet) and equals
//!   what `inspect stats` reads; the other way's counter did not move;
//! - a Service without endpoints: each refused connection counted `rejected`; an
//!   `internalTrafficPolicy: Local` Service whose only endpoint is on the other node: each
//!   datagram dropped and counted `svc_datapath_drops_total{reason="no_local_endpoint"}`;
//! - programming made stale for real: the agent follows its directory with a 6 s coalescing
//!   window and `--healthz-stale-after 2`; after an edit `/healthz` and `/livez` answer 200,
//!   then 503 once the change has waited 2 s (`lastUpdated` the last pass's time), then 200
//!   again once the pass has programmed it (the pass histogram and the endpoint change counter
//!   grew, the Service has its new endpoints).
//!
//! Needs root and the agent binary (`cargo build -p svc-agent`): fails, never skips, without
//! them.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use svc_tests::{
    k8s::{self, Agent, AgentSource, Backends, EndpointSlice, Protocol, Service, TcpSession},
    netns::Netns,
    testbed::{TestBed, vip4},
};

const SERVICE_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
/// Bound on every connect, read and write.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections through the `ClusterIP`.
const REQUESTS: u64 = 10;
/// Connections to the Service without endpoints, datagrams to the Local one.
const REFUSED: u64 = 3;
/// The agent's coalescing window: a change waits this long before its pass.
const COALESCE: Duration = Duration::from_secs(6);
/// `--healthz-stale-after`.
const STALE_AFTER: Duration = Duration::from_secs(2);
/// Where the agent serves metrics, in its node's namespace (the default).
const METRICS: &str = "127.0.0.1:10249";
const HEALTHZ_PORT: u16 = 10256;

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

/// One HTTP/1.1 GET from inside `ns`: status and body.
fn get(ns: &Netns, addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let path = path.to_owned();
    ns.run(move || {
        let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut out = String::new();
        stream.read_to_string(&mut out)?;
        let status = out
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("no status line in {out:?}"))?;
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((status, body))
    })
}

/// One scrape: each series (name and labels as rendered, `svc_frontends{state="programmed"}`)
/// with its value as rendered.
#[derive(Debug)]
struct Scrape(BTreeMap<String, String>);

impl Scrape {
    fn parse(text: &str) -> Self {
        Self(
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| {
                    let (series, value) = l.rsplit_once(' ')?;
                    Some((series.to_owned(), value.to_owned()))
                })
                .collect(),
        )
    }

    /// A counter's or count's value (0 when the series is not there yet).
    fn n(&self, series: &str) -> u64 {
        self.0.get(series).map_or(0, |v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{series} {v}: not a count"))
        })
    }

    /// A gauge's value.
    fn f(&self, series: &str) -> f64 {
        let v = self
            .0
            .get(series)
            .unwrap_or_else(|| panic!("no series {series} in {self:#?}"));
        v.parse()
            .unwrap_or_else(|_| panic!("{series} {v}: not a number"))
    }

    /// How much a counter grew since `before`.
    fn since(&self, before: &Self, series: &str) -> u64 {
        self.n(series) - before.n(series)
    }
}

impl Cluster {
    fn node_ns(&self) -> Netns {
        self.bed.topo.node(0).ns.clone()
    }

    fn healthz_addr(&self) -> SocketAddr {
        SocketAddr::new(self.bed.topo.node(0).underlay_v4.into(), HEALTHZ_PORT)
    }

    fn scrape(&self) -> Scrape {
        let (status, body) = get(&self.node_ns(), METRICS.parse().unwrap(), "/metrics")
            .unwrap_or_else(|e| panic!("scraping /metrics: {e:#}"));
        assert_eq!(status, 200, "{body}");
        assert!(body.ends_with("# EOF\n"), "not OpenMetrics text: {body}");
        Scrape::parse(&body)
    }

    fn probe(&self, path: &str) -> (u16, String) {
        get(&self.node_ns(), self.healthz_addr(), path)
            .unwrap_or_else(|e| panic!("GET {path}: {e:#}"))
    }

    /// The Services: `web` over web-0 and web-1, `empty` without endpoints, `local`
    /// (`internalTrafficPolicy: Local`, UDP) whose only endpoint is on node2.
    fn write(&self, web: &[&str]) {
        let topo = &self.bed.topo;
        let svc = Service::cluster_ip("web", &[vip4(130)]).port(
            "http",
            Protocol::Tcp,
            SERVICE_PORT,
            BACKEND_PORT,
        );
        let empty = Service::cluster_ip("empty", &[vip4(131)]).port(
            "http",
            Protocol::Tcp,
            SERVICE_PORT,
            BACKEND_PORT,
        );
        let local = Service::cluster_ip("local", &[vip4(132)])
            .port("dns", Protocol::Udp, SERVICE_PORT, BACKEND_PORT)
            .internal_traffic_policy_local();
        let docs = [
            svc.to_yaml(),
            EndpointSlice::new("web", false)
                .ports_of(&svc, &[])
                .ready_pods(topo, web.iter().map(|p| self.pod(p)))
                .to_yaml(),
            empty.to_yaml(),
            local.to_yaml(),
            EndpointSlice::new("local", false)
                .ports_of(&local, &[])
                .ready_pods(topo, [self.pod("web-1")])
                .to_yaml(),
        ];
        self.bed
            .manifests
            .write("svc.yaml", &k8s::documents(&docs))
            .unwrap_or_else(|e| panic!("writing svc.yaml: {e:#}"));
    }

    fn finish(self) {
        let Self { backends, bed } = self;
        drop(backends);
        bed.finish();
    }
}

fn packets(counter: &str) -> String {
    format!("svc_datapath_packets_total{{counter=\"{counter}\"}}")
}

const PASSES: &str = "kubeproxy_sync_proxy_rules_duration_seconds_count";

/// Polls `path` every 100 ms until it answers `want`, at most until `deadline`; returns when
/// (since `since`) and the body.
fn wait_for(
    c: &Cluster,
    path: &str,
    want: u16,
    since: Instant,
    deadline: Duration,
) -> anyhow::Result<(Duration, String)> {
    loop {
        let (status, body) = c.probe(path);
        if status == want {
            return Ok((since.elapsed(), body));
        }
        if since.elapsed() > deadline {
            bail!("{path} still {status} after {deadline:?}: {body}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts node1's agent: metrics on [`METRICS`] (the default), health on the node's underlay
/// address, a [`COALESCE`] window, stale after [`STALE_AFTER`].
fn start_agent(c: &mut Cluster) {
    let coalesce_ms = COALESCE.as_millis().to_string();
    let stale = STALE_AFTER.as_secs().to_string();
    let healthz = c.healthz_addr().to_string();
    let mut flags = vec![
        "--coalesce-ms",
        &coalesce_ms,
        "--healthz-stale-after",
        &stale,
        "--healthz-bind-address",
        &healthz,
    ];
    let sizes: Vec<(String, String)> = k8s::TEST_MAP_SIZES
        .iter()
        .map(|(f, v)| ((*f).to_owned(), v.to_string()))
        .collect();
    for (flag, value) in &sizes {
        flags.extend([flag.as_str(), value.as_str()]);
    }
    let agent = Agent::start_with_flags(
        &c.agent_bin,
        c.topo.node(0),
        &AgentSource::Dir(c.manifests.path()),
        &flags,
        k8s::AGENT_START_TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("starting svc-agent on node1: {e:#}"));
    c.bed.agents.push(agent);
    c.step(&format!(
        "svc-agent on node1 (pods translated {}), metrics on {METRICS}, health on {healthz}",
        if k8s::pods_at_socket() {
            "at the socket"
        } else {
            "per packet"
        }
    ));
}

/// After the first sync: healthy, the pass counted, the frontends programmed, maps filled.
fn check_first_sync(c: &Cluster) {
    let (status, body) = c.probe("/healthz");
    assert_eq!(status, 200, "/healthz after the first sync: {body}");
    assert!(
        body.starts_with("{\"lastUpdated\": \"") && body.ends_with("\"nodeEligible\": true}"),
        "{body}"
    );
    assert_eq!(c.probe("/livez").0, 200);
    let first = c.scrape();
    assert!(first.n(PASSES) >= 1, "the first sync is a pass");
    assert!(first.n("svc_passes_total{kind=\"full\"}") >= 1);
    assert_eq!(first.n("svc_frontends{state=\"programmed\"}"), 3);
    assert_eq!(first.n("svc_frontends{state=\"waiting\"}"), 0);
    for map in ["SERVICES_V1", "BACKENDS_V1"] {
        let fill = first.f(&format!("svc_map_fill_ratio{{map=\"{map}\"}}"));
        assert!(fill > 0.0 && fill < 1.0, "{map} fill {fill}");
    }
    // web: a frontend and two slots; empty: a frontend; local: a frontend (its endpoint is on
    // node2: no slot here).
    assert_eq!(first.n("svc_map_entries{map=\"SERVICES_V1\"}"), 5);
    assert_eq!(first.n("svc_map_max_entries{map=\"SERVICES_V1\"}"), 4096);
    assert!(first.f("svc_map_fill_ratio{map=\"CT_V1\"}") >= 0.0);
    c.step(&format!(
        "after the first sync: /healthz 200, {} pass(es), SERVICES_V1 fill {}, BACKENDS_V1 fill {}",
        first.n(PASSES),
        first.f("svc_map_fill_ratio{map=\"SERVICES_V1\"}"),
        first.f("svc_map_fill_ratio{map=\"BACKENDS_V1\"}")
    ));
}

/// Real connections through the `ClusterIP`: this configuration's translation counter grew by
/// what they ask, and reads as `inspect stats` reads it.
fn check_traffic(c: &Cluster) {
    let web = SocketAddr::new(vip4(130), SERVICE_PORT);
    let client = c.pod("client").ns.clone();
    let before = c.scrape();
    let answered = client
        .run(move || {
            (0..REQUESTS)
                .map(|i| Ok(k8s::tcp_request(web, &format!("req-{i}"), IO_TIMEOUT)?.label))
                .collect::<anyhow::Result<Vec<String>>>()
        })
        .unwrap_or_else(|e| panic!("requests to {web}: {e:#}{}", c.diag()));
    let after = c.scrape();
    let inspected = c.stats(0);
    let (here, not_there) = if k8s::pods_at_socket() {
        ("sock_xlate", "dnat")
    } else {
        ("dnat", "sock_xlate")
    };
    let translated = after.since(&before, &packets(here));
    if k8s::pods_at_socket() {
        assert_eq!(
            translated,
            REQUESTS,
            "one sock_xlate per connection{}",
            c.diag()
        );
    } else {
        assert!(
            translated >= 3 * REQUESTS,
            "dnat +{translated} for {REQUESTS} connections (SYN, request, FIN at least){}",
            c.diag()
        );
    }
    assert_eq!(after.since(&before, &packets(not_there)), 0);
    for counter in [here, "rev_nat", "sock_rev_nat", "tcp"] {
        assert_eq!(
            after.n(&packets(counter)),
            inspected[counter],
            "/metrics and inspect stats read the same kernel counter {counter}"
        );
    }
    c.step(&format!(
        "{REQUESTS} connections to {web} answered by {answered:?}: {here} +{translated} in \
         /metrics, as inspect stats reads it"
    ));
}

/// A Service without endpoints: refused, counted `rejected`; a Local Service with no
/// endpoint on this node: dropped, counted under its reason.
fn check_rejects_and_drops(c: &Cluster) {
    let empty = SocketAddr::new(vip4(131), SERVICE_PORT);
    let local = SocketAddr::new(vip4(132), SERVICE_PORT);
    let client = c.pod("client").ns.clone();
    let before = c.scrape();
    let refused = client
        .run(move || {
            let mut refused = 0;
            for _ in 0..REFUSED {
                if TcpSession::connect(empty, IO_TIMEOUT).is_err() {
                    refused += 1;
                }
            }
            let udp = k8s::udp_socket(SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 0))?;
            for i in 0..REFUSED {
                udp.send_to(format!("local-{i}").as_bytes(), local)?;
            }
            Ok(refused)
        })
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(refused, REFUSED, "connections to {empty} refused");
    let dropped = "svc_datapath_drops_total{reason=\"no_local_endpoint\"}";
    let deadline = Instant::now() + IO_TIMEOUT;
    let after = loop {
        // The datagrams leave asynchronously: wait for the last one.
        let now = c.scrape();
        if now.since(&before, dropped) >= REFUSED || Instant::now() > deadline {
            break now;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        after.since(&before, &packets("rejected")),
        REFUSED,
        "each refused connection counted rejected{}",
        c.diag()
    );
    assert_eq!(
        after.since(&before, dropped),
        REFUSED,
        "each datagram to {local} dropped as no_local_endpoint{}",
        c.diag()
    );
    c.step(&format!(
        "{empty} (no endpoints): {REFUSED} refused, rejected +{REFUSED}; {local} (Local, \
         endpoint on node2): {REFUSED} datagrams, drops{{no_local_endpoint}} +{REFUSED}"
    ));
}

/// Programming made stale for real: an edit waits [`COALESCE`] before its pass; health turns
/// 503 once it has waited [`STALE_AFTER`], and 200 again after the pass.
fn check_stale_and_back(c: &Cluster) {
    let before = c.scrape();
    let edited = Instant::now();
    c.write(&["web-0"]);
    let (status, _) = c.probe("/healthz");
    assert_eq!(status, 200, "a change younger than --healthz-stale-after");
    let (stale_at, body) = wait_for(c, "/healthz", 503, edited, COALESCE)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.agent(0).log()));
    assert!(
        stale_at + Duration::from_millis(200) >= STALE_AFTER,
        "503 after {stale_at:?}, before the change was {STALE_AFTER:?} old"
    );
    let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let time = |field: &str| -> k8s_openapi::jiff::Timestamp {
        json[field]
            .as_str()
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("{field} in {body}"))
    };
    let waited = time("currentTime").duration_since(time("lastUpdated"));
    assert!(
        waited.as_secs_f64() >= STALE_AFTER.as_secs_f64() - 0.2,
        "an unhealthy answer's lastUpdated is the last pass's, not now: {body}"
    );
    assert_eq!(c.probe("/livez").0, 503, "/livez is stale too");
    assert_eq!(
        c.scrape().since(&before, PASSES),
        0,
        "no pass while the change waits"
    );
    c.step(&format!(
        "edit waiting for its pass: /healthz and /livez 503 after {:.1} s: {body}",
        stale_at.as_secs_f64()
    ));
    let (fresh_at, body) = wait_for(c, "/healthz", 200, edited, COALESCE * 3)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.agent(0).log()));
    assert!(
        fresh_at + Duration::from_millis(200) >= COALESCE,
        "200 again after {fresh_at:?}, before the pass could run"
    );
    assert_eq!(c.probe("/livez").0, 200);
    let after = c.scrape();
    assert!(after.since(&before, PASSES) >= 1, "the pass was counted");
    assert!(after.since(&before, "svc_passes_total{kind=\"incremental\"}") >= 1);
    assert!(after.since(&before, "kubeproxy_sync_proxy_rules_endpoint_changes_total") >= 1);
    assert!(after.n("kubeproxy_healthz_total{code=\"503\"}") >= 1);
    let web = SocketAddr::new(vip4(130), SERVICE_PORT);
    let key = k8s::frontend_key(web, Protocol::Tcp);
    assert_eq!(
        c.programmed(0).backends(&key).map(|b| b.len()),
        Some(1),
        "the edit is programmed{}",
        c.diag()
    );
    c.step(&format!(
        "the pass ran after {:.1} s: /healthz 200 again ({body}), web has 1 endpoint",
        fresh_at.as_secs_f64()
    ));
}

#[test]
fn metrics_follow_passes_and_traffic_and_health_turns_stale_and_back() {
    let mut c = Cluster {
        backends: Backends::new(),
        bed: TestBed::new(&[(0, "client"), (0, "web-0"), (1, "web-1")]),
    };
    c.write(&["web-0", "web-1"]);
    c.serve_pods(&c.backends, &["web-0", "web-1"], BACKEND_PORT);
    start_agent(&mut c);
    check_first_sync(&c);
    check_traffic(&c);
    check_rejects_and_drops(&c);
    check_stale_and_back(&c);
    c.finish();
}
