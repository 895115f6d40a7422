//! The map contents a desired state means (pure: no maps, no kernel).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use svc_common::{
    Be16,
    addr::{Addr, FAMILY_V4, FAMILY_V6, from_v4},
    addrs::{AddrKey, AddrValue, addr_flags},
    net::ipproto,
    service::{
        self, Backend, BackendName, FrontendName, ServiceKey, ServiceValue, backend_flags, scope,
    },
};

use super::{ids::IdMap, layout::Layout, names::Fingerprint};
use crate::model::{self, DesiredState, EmptyAction, FrontendKey, FrontendKind, Protocol, Scope};

/// Key of a backend's id: address and port (shared by all frontends that use it).
pub type BackendRef = (IpAddr, u16);

/// Everything `SERVICES_V1` and `BACKENDS_V1` should hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rendered {
    /// `SERVICES_V1`: frontend entries (slot 0) and their backend slots.
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    /// `BACKENDS_V1`.
    pub backends: BTreeMap<u32, Backend>,
    /// `(frontend id, backend id)` of every backend a frontend's flows may be on: those in its
    /// slots and those kept for established flows. Not a map: when a pair leaves this set, the
    /// flows and affinity entries that name it are cleared (see `flows.rs`).
    pub reachable: BTreeSet<(u32, u32)>,
    /// Frontends left out, with why (capacity, unsupported protocol).
    pub skipped: Vec<(FrontendKey, String)>,
    /// `BACKEND_NAMES_V1`: the name of every backend in `backends` whose address has one in
    /// the desired state (as its fingerprint: see [`Fingerprint`]).
    pub names: BTreeMap<u32, Fingerprint<BackendName>>,
    /// `FRONTEND_NAMES_V1`: the Service port of every frontend in `services` (by the id of its
    /// slot 0; as its fingerprint).
    pub frontend_names: BTreeMap<u32, Fingerprint<FrontendName>>,
}

/// Map capacities the rendering must fit into.
#[derive(Debug, Clone, Copy)]
pub struct Capacity {
    /// Entries `SERVICES_V1` can hold.
    pub services: u32,
    /// Entries `BACKENDS_V1` can hold.
    pub backends: u32,
}

/// The 16-byte map form of an address, and its family.
#[must_use]
pub fn map_addr(ip: IpAddr) -> (Addr, u8) {
    match ip {
        IpAddr::V4(v4) => (from_v4(v4.octets()), FAMILY_V4),
        IpAddr::V6(v6) => (v6.octets(), FAMILY_V6),
    }
}

/// What `ADDRS_V1` should hold for these `SERVICES_V1` and `BACKENDS_V1` contents: every
/// frontend (slot 0) address flagged `FRONTEND`, every backend address flagged `BACKEND`.
#[must_use]
pub fn addresses(
    services: &BTreeMap<ServiceKey, ServiceValue>,
    backends: &BTreeMap<u32, Backend>,
) -> BTreeMap<AddrKey, AddrValue> {
    let mut out: BTreeMap<AddrKey, AddrValue> = BTreeMap::new();
    // ClusterIPs' unlisted ports are rejected; node, external and load-balancer addresses'
    // (flagged on their frontends) must not be: their other ports are someone else's.
    let frontends = services.iter().filter(|(k, _)| k.slot == 0).map(|(k, v)| {
        let flags = if k.scope == scope::EXTERNAL {
            addr_flags::FRONTEND | addr_flags::EXTERNAL
        } else if v.flags & service::flags::EXTERNAL_ADDR != 0 {
            addr_flags::FRONTEND
        } else {
            addr_flags::FRONTEND | addr_flags::CLUSTER_IP
        };
        (k.addr, k.family, flags)
    });
    let backends = backends
        .values()
        .map(|b| (b.addr, b.family, addr_flags::BACKEND));
    for (addr, family, flag) in frontends.chain(backends) {
        let key = AddrKey {
            addr,
            family,
            _pad: [0; 3],
        };
        out.entry(key).or_default().flags |= flag;
    }
    out
}

/// The entries of both `a` and `b`, an address in both with the flags of both.
#[must_use]
pub fn addresses_union(
    a: &BTreeMap<AddrKey, AddrValue>,
    b: &BTreeMap<AddrKey, AddrValue>,
) -> BTreeMap<AddrKey, AddrValue> {
    let mut out = a.clone();
    for (k, v) in b {
        out.entry(*k).or_default().flags |= v.flags;
    }
    out
}

/// The slot-0 key of a frontend.
#[must_use]
pub fn frontend_key(k: &FrontendKey) -> ServiceKey {
    let (addr, family) = map_addr(k.addr);
    ServiceKey {
        addr,
        port: Be16::from_host(k.port),
        slot: 0,
        proto: match k.proto {
            Protocol::Tcp => ipproto::TCP,
            Protocol::Udp => ipproto::UDP,
            Protocol::Sctp => ipproto::SCTP,
        },
        family,
        scope: match k.scope {
            Scope::Internal => scope::INTERNAL,
            Scope::External => scope::EXTERNAL,
        },
        _pad: 0,
    }
}

/// The `BACKENDS_V1` value of a backend.
pub(crate) fn backend_value(b: &model::Backend) -> Backend {
    let (addr, family) = map_addr(b.addr);
    let mut flags = 0;
    if b.local {
        flags |= backend_flags::LOCAL;
    }
    if b.terminating {
        flags |= backend_flags::TERMINATING;
    }
    Backend {
        addr,
        port: Be16::from_host(b.port),
        family,
        flags,
    }
}

/// Renders `desired` into map contents, allocating ids in `frontend_ids` / `backend_ids` and
/// freeing the ids of objects that are gone. Frontends that do not fit `cap` are left out
/// whole (never half-programmed) and listed in `skipped`: frontends are admitted in key order
/// (nothing is programmed yet: the reconciler decides with what it programmed before, through
/// [`Layout`](super::layout::Layout), which this uses too). Slots are in the sorted order.
pub fn render(
    desired: &DesiredState,
    frontend_ids: &mut IdMap<FrontendKey>,
    backend_ids: &mut IdMap<BackendRef>,
    cap: Capacity,
) -> Rendered {
    let mut layout = Layout::default();
    layout.frontend_ids = std::mem::take(frontend_ids);
    layout.backend_ids = std::mem::take(backend_ids);
    let known: Vec<FrontendKey> = layout.frontend_ids.keys().copied().collect();
    for k in known {
        if !desired.frontends.contains_key(&k) {
            layout.frontend_ids.remove(&k);
        }
    }
    layout.plan(desired, desired.frontends.keys().copied(), cap);
    layout.forget_unreferenced();
    let programmed: Vec<FrontendKey> = layout
        .frontend_ids
        .keys()
        .filter(|k| layout.target(k).is_none())
        .copied()
        .collect();
    for k in programmed {
        layout.frontend_ids.remove(&k);
    }
    let out = layout.rendered(desired);
    *frontend_ids = std::mem::take(&mut layout.frontend_ids);
    *backend_ids = std::mem::take(&mut layout.backend_ids);
    out
}

/// The slot 0 entry of `fe`, whose id is `frontend_id`.
pub(crate) fn slot0_value(fe: &model::Frontend, frontend_id: u32) -> ServiceValue {
    let mut flags = match (fe.backends.is_empty(), fe.on_empty) {
        (false, _) => 0,
        (true, EmptyAction::Reject) => service::flags::REJECT_EMPTY,
        (true, EmptyAction::Drop(_)) => service::flags::DROP_EMPTY,
    };
    if !fe.backends.is_empty() && fe.backends.iter().all(|b| b.terminating) {
        flags |= service::flags::SERVES_TERMINATING;
    }
    if fe.local_only {
        flags |= service::flags::LOCAL_ONLY;
    }
    flags |= match fe.kind {
        FrontendKind::ClusterIp => 0,
        FrontendKind::ExternalIp => service::flags::EXTERNAL_ADDR,
        FrontendKind::NodePort => service::flags::EXTERNAL_ADDR | service::flags::KIND_NODE_PORT,
        FrontendKind::LoadBalancerIp => {
            service::flags::EXTERNAL_ADDR | service::flags::KIND_LOAD_BALANCER
        }
    };
    let affinity = fe
        .affinity_timeout
        .map_or(0, |t| u32::try_from(t.as_secs()).unwrap_or(u32::MAX));
    ServiceValue {
        id: frontend_id,
        count: fe.backends.len() as u16,
        flags,
        affinity_timeout: affinity,
        _pad: 0,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::model::{Backend as MBackend, Frontend, ServicePortRef};

    fn fe_key(addr: &str, port: u16) -> FrontendKey {
        FrontendKey {
            addr: addr.parse().unwrap(),
            port,
            proto: Protocol::Tcp,
            scope: Scope::Internal,
        }
    }

    fn backend(addr: &str, port: u16) -> MBackend {
        MBackend {
            addr: addr.parse().unwrap(),
            port,
            local: false,
            terminating: false,
        }
    }

    fn frontend(backends: Vec<MBackend>, kept: Vec<MBackend>) -> Frontend {
        Frontend {
            kind: crate::model::FrontendKind::ClusterIp,
            source_ranges: Vec::new(),
            service: ServicePortRef {
                namespace: "default".into(),
                name: "web".into(),
                port_name: "".into(),
            },
            affinity_timeout: None,
            local_only: false,
            backends,
            kept_backends: kept,
            unready_backends: vec![],
            on_empty: EmptyAction::Reject,
        }
    }

    fn cap() -> Capacity {
        Capacity {
            services: 100,
            backends: 100,
        }
    }

    #[test]
    fn a_frontend_becomes_slot_zero_plus_one_slot_per_backend() {
        let mut desired = DesiredState::default();
        let mut fe = frontend(
            vec![backend("198.18.1.10", 5000), backend("198.18.2.10", 5000)],
            vec![],
        );
        fe.affinity_timeout = Some(Duration::from_hours(3));
        desired
            .frontends
            .insert(fe_key("198.19.0.10", 80), fe.into());
        let r = render(
            &desired,
            &mut IdMap::default(),
            &mut IdMap::default(),
            cap(),
        );
        assert_eq!(r.services.len(), 3);
        let slot0 = frontend_key(&fe_key("198.19.0.10", 80));
        assert_eq!(slot0.addr[..4], [198, 19, 0, 10]);
        assert_eq!(slot0.port.0.to_ne_bytes(), [0, 80]);
        let v = r.services[&slot0];
        assert_eq!((v.count, v.flags, v.affinity_timeout), (2, 0, 10800));
        let ids: Vec<u32> = (1..=2)
            .map(|s| r.services[&ServiceKey { slot: s, ..slot0 }].id)
            .collect();
        assert_eq!(r.backends.len(), 2);
        assert!(ids.iter().all(|id| r.backends.contains_key(id)));
    }

    #[test]
    fn kept_backends_are_in_the_backend_map_but_in_no_slot() {
        let mut d = DesiredState::default();
        d.frontends.insert(
            fe_key("198.19.0.10", 80),
            frontend(
                vec![backend("198.18.1.10", 5000)],
                vec![backend("198.18.1.11", 5000)],
            )
            .into(),
        );
        let (mut f, mut b) = (IdMap::default(), IdMap::default());
        let r = render(&d, &mut f, &mut b, cap());
        assert_eq!(r.services.len(), 2);
        assert_eq!(r.backends.len(), 2);
        let frontend = r.services[&frontend_key(&fe_key("198.19.0.10", 80))].id;
        let kept = b.get(&("198.18.1.11".parse().unwrap(), 5000)).unwrap();
        assert!(
            r.reachable.contains(&(frontend, kept)),
            "established flows on a kept backend are reachable: {:?}",
            r.reachable
        );
        assert_eq!(r.reachable.len(), 2);
    }

    #[test]
    fn unready_backends_are_in_the_backend_map_but_not_reachable() {
        let mut d = DesiredState::default();
        let mut fe = frontend(vec![backend("198.18.1.10", 5000)], vec![]);
        fe.unready_backends = vec![backend("198.18.1.11", 5000)];
        d.frontends.insert(fe_key("198.19.0.10", 80), fe.into());
        let (mut f, mut b) = (IdMap::default(), IdMap::default());
        let r = render(&d, &mut f, &mut b, cap());
        assert_eq!(r.services.len(), 2, "slot 0 and one slot");
        let unready = b.get(&("198.18.1.11".parse().unwrap(), 5000)).unwrap();
        assert!(
            r.backends.contains_key(&unready),
            "established TCP flows find it"
        );
        let frontend = r.services[&frontend_key(&fe_key("198.19.0.10", 80))].id;
        assert!(
            !r.reachable.contains(&(frontend, unready)),
            "its UDP flows and affinity are cleared: {:?}",
            r.reachable
        );
    }

    #[test]
    fn empty_frontends_carry_what_to_do() {
        let mut d = DesiredState::default();
        d.frontends
            .insert(fe_key("198.19.0.10", 80), frontend(vec![], vec![]).into());
        let mut drop = frontend(vec![], vec![backend("198.18.2.10", 1)]);
        drop.on_empty = EmptyAction::Drop(model::DropReason::InternalTrafficPolicyLocal);
        d.frontends.insert(fe_key("198.19.0.11", 80), drop.into());
        let r = render(&d, &mut IdMap::default(), &mut IdMap::default(), cap());
        assert_eq!(
            r.services[&frontend_key(&fe_key("198.19.0.10", 80))].flags,
            service::flags::REJECT_EMPTY
        );
        assert_eq!(
            r.services[&frontend_key(&fe_key("198.19.0.11", 80))].flags,
            service::flags::DROP_EMPTY
        );
    }

    #[test]
    fn ids_survive_rerender_and_shared_backends_share_an_id() {
        let mut d = DesiredState::default();
        d.frontends.insert(
            fe_key("198.19.0.10", 80),
            frontend(vec![backend("198.18.1.10", 5000)], vec![]).into(),
        );
        d.frontends.insert(
            fe_key("198.19.0.11", 80),
            frontend(vec![backend("198.18.1.10", 5000)], vec![]).into(),
        );
        let (mut f, mut b) = (IdMap::default(), IdMap::default());
        let r1 = render(&d, &mut f, &mut b, cap());
        assert_eq!(r1.backends.len(), 1);
        let r2 = render(&d, &mut f, &mut b, cap());
        assert_eq!(r1, r2);
    }

    #[test]
    fn frontends_that_do_not_fit_are_left_out_whole() {
        let mut d = DesiredState::default();
        d.frontends.insert(
            fe_key("198.19.0.10", 80),
            frontend(
                vec![backend("198.18.1.10", 1), backend("198.18.1.11", 1)],
                vec![],
            )
            .into(),
        );
        d.frontends.insert(
            fe_key("198.19.0.11", 80),
            frontend(
                vec![backend("198.18.1.12", 1), backend("198.18.1.13", 1)],
                vec![],
            )
            .into(),
        );
        let r = render(
            &d,
            &mut IdMap::default(),
            &mut IdMap::default(),
            Capacity {
                services: 4,
                backends: 100,
            },
        );
        assert_eq!(
            r.services.len(),
            3,
            "only the first frontend (3 entries) fits in 4"
        );
        assert_eq!(r.skipped.len(), 1);
        assert!(r.skipped[0].1.contains("SERVICES_V1 is full (4 entries)"));
        assert_eq!(
            r.backends.len(),
            2,
            "backends of a skipped frontend are not written"
        );
    }

    #[test]
    fn only_cluster_ip_frontend_addresses_refuse_unlisted_ports() {
        let key = |ip: &str, scope| ServiceKey {
            scope,
            ..frontend_key(&FrontendKey {
                scope: Scope::Internal,
                ..fe_key(ip, 80)
            })
        };
        let value = ServiceValue::default();
        let external_addr = ServiceValue {
            flags: service::flags::EXTERNAL_ADDR,
            ..value
        };
        let services = BTreeMap::from([
            (key("198.19.0.10", scope::INTERNAL), value),
            // A node address with a NodePort: both scopes, neither refuses other ports.
            (key("198.18.0.1", scope::INTERNAL), external_addr),
            (key("198.18.0.1", scope::EXTERNAL), external_addr),
            (key("198.19.0.11", scope::EXTERNAL), value),
            (key("2001:db8:f::10", scope::INTERNAL), value),
        ]);
        let backends = BTreeMap::from([(1, backend_value(&backend("198.19.0.10", 8080)))]);
        let flags = |ip: &str| {
            let (addr, family) = map_addr(ip.parse().unwrap());
            addresses(&services, &backends)
                .get(&AddrKey {
                    addr,
                    family,
                    _pad: [0; 3],
                })
                .map(|v| v.flags)
        };
        let cluster_ip = addr_flags::FRONTEND | addr_flags::CLUSTER_IP;
        assert_eq!(flags("198.19.0.10"), Some(cluster_ip | addr_flags::BACKEND));
        assert_eq!(flags("2001:db8:f::10"), Some(cluster_ip));
        let external = addr_flags::FRONTEND | addr_flags::EXTERNAL;
        assert_eq!(
            flags("198.19.0.11"),
            Some(external),
            "an external-scope address keeps its other ports"
        );
        assert_eq!(flags("198.18.0.1"), Some(external), "a node address too");
    }
}
