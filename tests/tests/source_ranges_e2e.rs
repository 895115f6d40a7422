//! `loadBalancerSourceRanges` end to end: a `LoadBalancer` Service whose load balancer IP is
//! routed by the external namespace to node1, with ranges that name the external client's
//! address.
//!
//! - The client inside the ranges reaches the load balancer IP.
//! - A second address of the external namespace (`198.18.0.101`, outside the ranges; the route
//!   to the load balancer IP takes it as source) is dropped, counted `source_range` on node1.
//! - Ranges that add it: its new connections are served. Ranges that take it out again: its new
//!   connections are dropped, while the connection it opened before keeps working (as
//!   kube-proxy's rules apply to new conntrack entries).
//!
//! Needs root and the agent binary (`cargo build -p svc-agent`): fails, never skips, without
//! them. Runs with `SVC_TEST_SOCKET_LB=all` and `=host-only` alike (external clients are never
//! translated at the socket).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use svc_tests::{
    k8s::{self, Endpoint, EndpointSlice, Protocol, Service, TcpSession},
    netns::{ETH0, EXTERNAL_V4},
    testbed::{TestBed, vip4},
};

const SERVICE_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
/// The load balancer IP, routed by the external client to node1.
const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 202, 1);
/// The external namespace's second address, outside the ranges until they name it.
const SECOND: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 101);
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on a request expected to go unanswered (dropped).
const FAIL_TIMEOUT: Duration = Duration::from_millis(400);
/// How long the agent may take to program a change.
const SYNC_TIMEOUT: Duration = Duration::from_secs(5);

/// The Service `lb` (IPv4, TCP 80 -> 8080, load balancer IP [`LB_IP`]) with `ranges`.
fn lb(ranges: &[&str]) -> Service {
    Service::cluster_ip("lb", &[vip4(160)])
        .port("http", Protocol::Tcp, SERVICE_PORT, BACKEND_PORT)
        .load_balancer(&[LB_IP.into()])
        .load_balancer_source_ranges(ranges)
}

fn write(bed: &TestBed, service: &Service) {
    let slice = EndpointSlice::new(&service.name, false)
        .ports_of(service, &[])
        .endpoint(Endpoint::ready(&bed.topo, bed.pod("web-0"), false));
    bed.manifests
        .write(
            "lb.yaml",
            &k8s::documents(&[service.to_yaml(), slice.to_yaml()]),
        )
        .expect("writing the Service");
}

fn source_range_drops(bed: &TestBed) -> u64 {
    bed.stats(0)
        .get("source_range")
        .copied()
        .unwrap_or_default()
}

/// Retries a new connection to `dst` until its outcome is `served` (within [`SYNC_TIMEOUT`]):
/// the agent programs a change within that.
fn wait_until(bed: &TestBed, dst: SocketAddr, served: bool, what: &str) {
    let deadline = Instant::now() + SYNC_TIMEOUT;
    loop {
        let result = bed
            .topo
            .external()
            .ns
            .run(|| k8s::tcp_request(dst, "probe", FAIL_TIMEOUT));
        if result.is_ok() == served {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {SYNC_TIMEOUT:?}{}",
            bed.diag()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn only_clients_in_the_source_ranges_reach_the_load_balancer_ip() {
    let mut bed = TestBed::new(&[(0, "web-0")]);
    let backends = k8s::Backends::new();
    let pod = bed.pod("web-0");
    backends
        .serve(
            &pod.ns,
            "web-0",
            SocketAddr::new(pod.ipv4.into(), BACKEND_PORT),
        )
        .expect("serving on web-0");
    let client_only = format!("{EXTERNAL_V4}/32");
    write(&bed, &lb(&[&client_only, "2001:db8:99::/48"]));
    bed.start_agents();
    let key = format!("{LB_IP}:{SERVICE_PORT} TCP external");
    let deadline = Instant::now() + SYNC_TIMEOUT;
    while bed.programmed(0).backends(&key).is_none() {
        assert!(
            Instant::now() < deadline,
            "node1 did not program {key}{}",
            bed.diag()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let ext = &bed.topo.external().ns;
    let via = bed.topo.node(0).underlay_v4.to_string();
    let lb_route = format!("{LB_IP}/32");
    ext.ip(["route", "add", &lb_route, "via", &via])
        .expect("routing the load balancer IP to node1");
    let dst = SocketAddr::new(LB_IP.into(), SERVICE_PORT);

    // 1. The client in the ranges is served, its address kept (the endpoint is on node1).
    for i in 0..3 {
        let answer = ext
            .run(|| k8s::tcp_request(dst, &format!("inside-{i}"), IO_TIMEOUT))
            .unwrap_or_else(|e| panic!("from {EXTERNAL_V4} to {dst}: {e:#}{}", bed.diag()));
        assert_eq!(answer.label, "web-0");
        assert_eq!(answer.client_seen, IpAddr::from(EXTERNAL_V4));
    }
    bed.step(&format!("{EXTERNAL_V4} (in the ranges) reaches {dst}"));

    // 2. From the second address (outside the ranges): dropped and counted.
    ext.ip(["addr", "add", &format!("{SECOND}/24"), "dev", ETH0])
        .expect("adding the second address");
    ext.ip([
        "route",
        "replace",
        &lb_route,
        "via",
        &via,
        "src",
        &SECOND.to_string(),
    ])
    .expect("routing the load balancer IP from the second address");
    let before = source_range_drops(&bed);
    let result = ext.run(|| k8s::tcp_request(dst, "outside", FAIL_TIMEOUT));
    assert!(
        result.is_err(),
        "{SECOND} (outside the ranges) was served: {result:?}"
    );
    let after = source_range_drops(&bed);
    assert!(
        after > before,
        "node1 counted no source_range drop{}",
        bed.diag()
    );
    bed.step(&format!(
        "{SECOND} (outside the ranges) dropped, counted source_range"
    ));

    // 3. Ranges that name it: its new connections are served; one stays open.
    write(&bed, &lb(&[&client_only, &format!("{SECOND}/32")]));
    wait_until(
        &bed,
        dst,
        true,
        "the second address served once the ranges name it",
    );
    let mut session = ext
        .run(|| TcpSession::connect(dst, IO_TIMEOUT))
        .expect("connecting from the second address");
    let answer = session.ask("open").expect("first request");
    assert_eq!(answer.client_seen, IpAddr::from(SECOND));
    bed.step(&format!(
        "ranges name {SECOND}: served, a connection stays open"
    ));

    // 4. Ranges without it again: new connections dropped, the open one keeps going.
    write(&bed, &lb(&[&client_only]));
    wait_until(
        &bed,
        dst,
        false,
        "the second address dropped once the ranges leave it out",
    );
    for i in 0..3 {
        let answer = session
            .ask(&format!("still-{i}"))
            .unwrap_or_else(|e| panic!("the established connection: {e:#}{}", bed.diag()));
        assert_eq!(answer.label, "web-0");
    }
    bed.step("ranges without it: new connections dropped, the established one goes on");
    drop(session);
    drop(backends);
    bed.finish();
}
