//! The reconciler with `loadBalancerSourceRanges`: a restricted frontend's `SOURCE_RANGES_V1`
//! entries are written before it is reachable and removed after it is gone, an incremental
//! pass writes only what the change touched, a frontend whose entries cannot be written is not
//! programmed (and retried), and a restart adopts what the map holds.

use super::{tests::FakeMaps, *};
use crate::model::{Backend as MBackend, EmptyAction, Frontend, FrontendKind, ServicePortRef};

const LB: &str = "198.19.7.1";

fn key(port: u16) -> FrontendKey {
    FrontendKey {
        addr: LB.parse().unwrap(),
        port,
        proto: Protocol::Tcp,
        scope: Scope::External,
    }
}

fn lb(ranges: &[&str]) -> Frontend {
    Frontend {
        service: ServicePortRef {
            namespace: "default".into(),
            name: "lb".into(),
            port_name: "".into(),
        },
        kind: FrontendKind::LoadBalancerIp,
        source_ranges: ranges.iter().map(|r| r.parse().unwrap()).collect(),
        affinity_timeout: None,
        local_only: false,
        backends: vec![MBackend {
            addr: "198.18.2.10".parse().unwrap(),
            port: 8443,
            local: true,
            terminating: false,
        }],
        kept_backends: Vec::new(),
        unready_backends: Vec::new(),
        on_empty: EmptyAction::Reject,
    }
}

fn state(frontends: &[(u16, &[&str])]) -> DesiredState {
    DesiredState {
        frontends: frontends
            .iter()
            .map(|(port, ranges)| (key(*port), lb(ranges).into()))
            .collect(),
        ..DesiredState::default()
    }
}

fn delta(ports: &[u16]) -> Delta {
    Delta {
        frontends: ports.iter().map(|p| key(*p)).collect(),
        ..Delta::default()
    }
}

/// Where in the log the first line starting with `prefix` is.
fn at(log: &[String], prefix: &str) -> usize {
    log.iter()
        .position(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` in {log:#?}"))
}

fn programmed(r: &Reconciler<FakeMaps>, port: u16) -> bool {
    r.current().services.contains_key(&frontend_key(&key(port)))
}

#[test]
fn ranges_go_in_before_the_frontend_and_out_after_it() {
    let mut r = Reconciler::adopt(FakeMaps::default()).unwrap();
    let report = r.apply(&state(&[(443, &["198.18.0.0/24"])]));
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let log = &r.maps.log;
    let slot0 = at(log, "put slot 0");
    assert!(
        at(log, "put range 198.19.7.1:443/6 (deny)") < slot0,
        "{log:#?}"
    );
    assert!(at(log, "put range 198.19.7.1:443/6 <- 198.18.0.0/24") < slot0);
    assert_eq!(r.maps.source_ranges.len(), 2);
    // The ranges change (incremental): only the ranges are written, the old one after.
    r.maps.log.clear();
    let d = state(&[(443, &["198.18.5.0/24"])]);
    let report = r.apply_delta(&d, &delta(&[443]));
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(
        r.maps.log,
        [
            "put range 198.19.7.1:443/6 <- 198.18.5.0/24",
            "del range 198.19.7.1:443/6 <- 198.18.0.0/24",
        ]
    );
    // The frontend goes: its entry first, its ranges after.
    r.maps.log.clear();
    let report = r.apply_delta(&DesiredState::default(), &delta(&[443]));
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let log = &r.maps.log;
    assert!(at(log, "del slot 0") < at(log, "del range"), "{log:#?}");
    assert!(r.maps.source_ranges.is_empty());
    assert_eq!(r.ranges.frontends(), 0);
}

#[test]
fn an_incremental_pass_writes_only_the_ranges_of_its_frontends() {
    let mut r = Reconciler::adopt(FakeMaps::default()).unwrap();
    let d = state(&[(443, &["198.18.0.0/24"]), (80, &[])]);
    assert!(r.apply(&d).errors.is_empty());
    r.maps.log.clear();
    // Another frontend changes: no range entry is written or removed.
    let mut d2 = d.clone();
    std::sync::Arc::make_mut(d2.frontends.get_mut(&key(80)).unwrap()).backends[0].port = 8080;
    let report = r.apply_delta(&d2, &delta(&[80]));
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(
        !r.maps.log.iter().any(|l| l.contains("range")),
        "{:#?}",
        r.maps.log
    );
    // Ranges gone from the Service: the frontend stays, its entries go.
    r.maps.log.clear();
    let d3 = state(&[(443, &[]), (80, &[])]);
    assert!(r.apply_delta(&d3, &delta(&[443])).errors.is_empty());
    assert!(r.maps.source_ranges.is_empty());
    assert!(programmed(&r, 443));
    assert!(
        !r.maps.log.iter().any(|l| l.starts_with("put slot")),
        "{:#?}",
        r.maps.log
    );
}

#[test]
fn a_frontend_whose_ranges_cannot_be_written_is_not_programmed_until_they_are() {
    let mut maps = FakeMaps::default();
    maps.fail_ranges = true;
    let mut r = Reconciler::adopt(maps).unwrap();
    let d = state(&[(443, &["198.18.0.0/24"]), (80, &[])]);
    let report = r.apply(&d);
    assert!(
        !programmed(&r, 443),
        "a restricted LB IP without its ranges is never open"
    );
    assert!(
        programmed(&r, 80),
        "an unrestricted frontend is not concerned"
    );
    assert!(
        report
            .skipped
            .iter()
            .any(|(k, why)| *k == key(443) && why.contains("SOURCE_RANGES_V1")),
        "{:?}",
        report.skipped
    );
    assert!(report.retry_after.is_some());
    // Room again: the retry (an empty incremental pass) programs it, ranges first.
    r.maps.fail_ranges = false;
    r.maps.log.clear();
    let report = r.apply_delta(&d, &Delta::default());
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(programmed(&r, 443));
    let log = &r.maps.log;
    assert!(at(log, "put range") < at(log, "put slot 0"), "{log:#?}");
    // A programmed, open frontend that gets ranges it cannot write is taken out.
    let mut r = Reconciler::adopt(FakeMaps::default()).unwrap();
    assert!(r.apply(&state(&[(443, &[])])).errors.is_empty());
    r.maps.fail_ranges = true;
    r.apply_delta(&d, &delta(&[443]));
    assert!(!programmed(&r, 443));
}

#[test]
fn a_restart_adopts_the_ranges_and_rewrites_nothing() {
    let d = state(&[(443, &["198.18.0.0/24", "198.18.9.0/24"])]);
    let mut r = Reconciler::adopt(FakeMaps::default()).unwrap();
    assert!(r.apply(&d).errors.is_empty());
    let mut maps = r.maps;
    maps.log.clear();
    let mut again = Reconciler::adopt(maps).unwrap();
    assert_eq!(again.apply(&d), ReconcileReport::default());
    assert!(again.maps.log.is_empty(), "{:#?}", again.maps.log);
    // A stale entry (an earlier agent's, for a frontend gone since) is removed by the full
    // pass; one the map lost is written again.
    let stale = ranges::allow_key(
        &ranges::frontend_part(&key(8443)),
        &"198.18.1.0/24".parse().unwrap(),
    );
    again
        .maps
        .source_ranges
        .insert(stale, svc_common::ranges::verdict::ALLOW);
    let lost = *again.maps.source_ranges.keys().next().unwrap();
    again.maps.source_ranges.remove(&lost);
    again.maps.log.clear();
    assert!(again.apply(&d).errors.is_empty());
    assert_eq!(again.maps.source_ranges.len(), 3);
    assert!(!again.maps.source_ranges.contains_key(&stale));
    assert!(again.maps.source_ranges.contains_key(&lost));
}
