//! Full maps, as a new user meets them, end to end with the real agent (standalone source):
//! `SERVICES_V1` holds ten 3-endpoint Services; thirteen are defined.
//!
//! - The first ten (by address) are programmed, the other three wait, each named in the log.
//! - A programmed Service keeps its place: a new Service with a lower address waits, and one
//!   that grows while the map is full keeps its old endpoints (never half-programmed).
//! - Deleting three programmed Services lets the waiting ones in at once, without any other
//!   change (deletes free room before writes need it, and what waits is retried), and traffic
//!   to one of them is served.
//!
//! Needs root and a built agent (`cargo build -p svc-agent`): fails, never skips, without them.
//! Runs with `SVC_TEST_SOCKET_LB=all` and `=host-only` alike.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    time::{Duration, Instant},
};

use svc_tests::{
    k8s::{self, Backends, EndpointSlice, Protocol, Service, frontend_key},
    testbed::{TestBed, vip4},
};

/// How long the agents may take to apply a change of the directory.
const SYNC_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(2);
const SERVICE_PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;
/// `SERVICES_V1` entries: ten frontends of three endpoints (1 + 3 entries each).
const SERVICE_ENTRIES: u32 = 40;
const PODS: [&str; 4] = ["web-0", "web-1", "web-2", "web-3"];

/// The VIP of Service `i`.
fn vip(i: u32) -> std::net::IpAddr {
    vip4(100 + i)
}

/// Service `svc-<i>` and its slice over `pods`, as one file's text.
fn service(bed: &TestBed, i: u32, pods: &[&str]) -> String {
    let name = format!("svc-{i:02}");
    let svc = Service::cluster_ip(&name, &[vip(i)]).port(
        "http",
        Protocol::Tcp,
        SERVICE_PORT,
        TARGET_PORT,
    );
    let slice = EndpointSlice::new(&name, false)
        .ports_of(&svc, &[])
        .ready_pods(&bed.topo, pods.iter().map(|p| bed.pod(p)));
    k8s::documents(&[svc.to_yaml(), slice.to_yaml()])
}

fn file(i: u32) -> String {
    format!("svc-{i:02}.yaml")
}

/// What every node programs for Service `i` (`None`: not programmed).
fn programmed(bed: &TestBed, i: u32) -> Vec<Option<BTreeSet<String>>> {
    let key = frontend_key(SocketAddr::new(vip(i), SERVICE_PORT), Protocol::Tcp);
    (0..bed.agents.len())
        .map(|n| bed.programmed(n).backends(&key))
        .collect()
}

fn expect(bed: &TestBed, pods: &[&str]) -> BTreeSet<String> {
    pods.iter()
        .map(|p| SocketAddr::new(bed.pod_ip(p, vip4(1)), TARGET_PORT).to_string())
        .collect()
}

/// Waits until every node programs exactly the Services `on` (with `pods`) out of `all`.
fn wait_for(bed: &TestBed, all: &[u32], on: &[u32], pods: &[&str], what: &str) {
    let deadline = Instant::now() + SYNC_TIMEOUT;
    let want_on = Some(expect(bed, pods));
    loop {
        let now: Vec<(u32, Vec<Option<BTreeSet<String>>>)> =
            all.iter().map(|&i| (i, programmed(bed, i))).collect();
        let good = now.iter().all(|(i, p)| {
            if on.contains(i) {
                p.iter().all(|b| *b == want_on)
            } else {
                p.iter().all(Option::is_none)
            }
        });
        if good {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: want {on:?} programmed, have {now:?}\n{}",
            bed.diag()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_full_map_keeps_what_it_holds_and_lets_waiting_services_in_as_room_appears() {
    let mut bed = TestBed::new(&[
        (0, "client"),
        (0, "web-0"),
        (1, "web-1"),
        (1, "web-2"),
        (0, "web-3"),
    ]);
    let backends = Backends::new();
    for name in PODS {
        let pod = bed.pod(name);
        backends
            .serve(&pod.ns, name, SocketAddr::new(pod.ipv4.into(), TARGET_PORT))
            .unwrap_or_else(|e| panic!("serving on {name}: {e:#}"));
    }
    let three = &PODS[..3];
    // Services 1..=13; 1..=10 fit.
    for i in 1..=13 {
        bed.manifests
            .write(&file(i), &service(&bed, i, three))
            .unwrap();
    }
    let mut sizes = k8s::TEST_MAP_SIZES.to_vec();
    sizes.retain(|(flag, _)| *flag != "--max-service-entries");
    sizes.push(("--max-service-entries", SERVICE_ENTRIES));
    bed.start_agents_sized(&sizes);
    let all: Vec<u32> = (0..=13).collect();
    let first_ten: Vec<u32> = (1..=10).collect();
    wait_for(&bed, &all, &first_ten, three, "start: the first ten fit");
    for agent in &bed.agents {
        let log = agent.log();
        for i in 11..=13 {
            let name = format!("svc-{i:02}");
            assert!(
                log.lines()
                    .any(|l| l.contains("not programmed") && l.contains(&name)),
                "{}: no line names waiting Service {name}; log:\n{log}",
                agent.node()
            );
        }
    }

    bed.step("a new Service with a lower address waits: programmed ones keep their place");
    bed.manifests
        .write(&file(0), &service(&bed, 0, three))
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    wait_for(&bed, &all, &first_ten, three, "after svc-00 was added");

    bed.step("a programmed Service that grows while the map is full keeps its old endpoints");
    bed.manifests
        .write(&file(1), &service(&bed, 1, &PODS))
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    wait_for(&bed, &all, &first_ten, three, "after svc-01 grew");

    bed.step("deleting three programmed Services lets three waiting ones in, with no other change");
    for i in [4, 5, 6] {
        std::fs::remove_file(bed.manifests.path().join(file(i))).unwrap();
    }
    // Room for three: who gets it follows the admission order (programmed first, then by
    // address): svc-01's growth, then svc-00, then svc-11 (svc-01 needs one entry more).
    let deadline = Instant::now() + SYNC_TIMEOUT;
    loop {
        let gone = [4, 5, 6]
            .iter()
            .all(|&i| programmed(&bed, i).iter().all(Option::is_none));
        let in_now: Vec<u32> = [0, 11, 12, 13]
            .into_iter()
            .filter(|&i| programmed(&bed, i).iter().all(Option::is_some))
            .collect();
        let grown = programmed(&bed, 1)
            .iter()
            .all(|b| *b == Some(expect(&bed, &PODS)));
        // 40 entries: svc-01 (5) + 2,3,7,8,9,10 (6 x 4 = 24) = 29; 11 left: two more fit.
        if gone && grown && in_now == [0, 11] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after the deletes: gone {gone}, grown {grown}, newly in {in_now:?}\n{}",
            bed.diag()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    bed.step("traffic to a Service that waited is served");
    let client = bed.pod("client");
    let dst = SocketAddr::new(vip(11), SERVICE_PORT);
    let answer = client
        .ns
        .run(|| k8s::tcp_request(dst, "hello", IO_TIMEOUT))
        .unwrap_or_else(|e| panic!("request to {dst}: {e:#}\n{}", bed.diag()));
    assert!(
        three.contains(&answer.label.as_str()),
        "answered by {}",
        answer.label
    );
    drop(backends);
    bed.finish_allowing(&["not programmed", "is full"]);
}
