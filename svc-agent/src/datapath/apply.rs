//! Writing rendered state into the maps: only what changed, in an order that never lets a
//! program see a half-programmed frontend.
//!
//! Order: backends first, then backend slots, then frontend entries (slot 0), then removals in
//! reverse (frontend entries, stale slots, unused backends). A frontend whose slots could not
//! all be written keeps its old slot 0 (count), which only names slots that exist.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData, PerCpuHashMap, PerCpuValues},
    util::nr_cpus,
};
use svc_common::{
    addr::{FAMILY_V4, to_v4},
    net::ipproto,
    service::{Backend, ServiceKey, ServiceValue, scope},
    stats::Counter,
};

use super::{
    ids::IdMap,
    render::{BackendRef, Capacity, Rendered, render},
};
use crate::model::{DesiredState, FrontendKey, Protocol, Scope};

/// Access to `SERVICES_V1` and `BACKENDS_V1`.
pub trait DatapathMaps {
    /// Every entry of `SERVICES_V1`.
    fn services(&self) -> anyhow::Result<BTreeMap<ServiceKey, ServiceValue>>;
    /// Every entry of `BACKENDS_V1`.
    fn backends(&self) -> anyhow::Result<BTreeMap<u32, Backend>>;
    /// Writes one `SERVICES_V1` entry.
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> anyhow::Result<()>;
    /// Removes one `SERVICES_V1` entry.
    fn del_service(&mut self, key: &ServiceKey) -> anyhow::Result<()>;
    /// Writes one `BACKENDS_V1` entry.
    fn put_backend(&mut self, id: u32, value: &Backend) -> anyhow::Result<()>;
    /// Removes one `BACKENDS_V1` entry.
    fn del_backend(&mut self, id: u32) -> anyhow::Result<()>;
    /// Creates (or zeroes) the counters of a frontend or backend id.
    fn new_counters(&mut self, kind: CounterKind, id: u32) -> anyhow::Result<()>;
    /// Removes the counters of a frontend or backend id.
    fn del_counters(&mut self, kind: CounterKind, id: u32) -> anyhow::Result<()>;
    /// How many entries each map holds at most.
    fn capacity(&self) -> Capacity;
}

/// Which counters: `SVC_STATS_V1` (frontend ids) or `BACKEND_STATS_V1` (backend ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterKind {
    /// Per-frontend counters.
    Frontend,
    /// Per-backend counters.
    Backend,
}

/// The real maps, taken out of a loaded object (load its programs first: they keep the maps).
pub struct AyaMaps {
    services: BpfHashMap<MapData, ServiceKey, ServiceValue>,
    backends: BpfHashMap<MapData, u32, Backend>,
    svc_stats: PerCpuHashMap<MapData, u32, Counter>,
    backend_stats: PerCpuHashMap<MapData, u32, Counter>,
    cap: Capacity,
}

impl AyaMaps {
    /// Takes `SERVICES_V1` and `BACKENDS_V1` out of `ebpf`.
    pub fn take(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        let (services, svc_max) = take_hash(ebpf, "SERVICES_V1")?;
        let (backends, be_max) = take_hash(ebpf, "BACKENDS_V1")?;
        let take_stats =
            |ebpf: &mut Ebpf, name: &str| -> anyhow::Result<PerCpuHashMap<MapData, u32, Counter>> {
                let map = ebpf
                    .take_map(name)
                    .ok_or_else(|| anyhow!("no map {name} in the object"))?;
                Ok(PerCpuHashMap::try_from(map)?)
            };
        Ok(Self {
            services: BpfHashMap::try_from(services)?,
            backends: BpfHashMap::try_from(backends)?,
            svc_stats: take_stats(ebpf, "SVC_STATS_V1")?,
            backend_stats: take_stats(ebpf, "BACKEND_STATS_V1")?,
            cap: Capacity {
                services: svc_max,
                backends: be_max,
            },
        })
    }
}

/// Takes a hash map out of `ebpf`, with its size.
fn take_hash(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<(aya::maps::Map, u32)> {
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("no map {name} in the object"))?;
    let aya::maps::Map::HashMap(data) = &map else {
        return Err(anyhow!("map {name} is not a hash map"));
    };
    let max = data
        .info()
        .with_context(|| format!("reading {name}'s info"))?
        .max_entries();
    Ok((map, max))
}

impl DatapathMaps for AyaMaps {
    fn services(&self) -> anyhow::Result<BTreeMap<ServiceKey, ServiceValue>> {
        self.services
            .iter()
            .map(|r| r.context("reading SERVICES_V1"))
            .collect()
    }
    fn backends(&self) -> anyhow::Result<BTreeMap<u32, Backend>> {
        self.backends
            .iter()
            .map(|r| r.context("reading BACKENDS_V1"))
            .collect()
    }
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> anyhow::Result<()> {
        self.services
            .insert(key, value, 0)
            .context("writing SERVICES_V1")
    }
    fn del_service(&mut self, key: &ServiceKey) -> anyhow::Result<()> {
        self.services
            .remove(key)
            .context("deleting from SERVICES_V1")
    }
    fn put_backend(&mut self, id: u32, value: &Backend) -> anyhow::Result<()> {
        self.backends
            .insert(id, value, 0)
            .context("writing BACKENDS_V1")
    }
    fn del_backend(&mut self, id: u32) -> anyhow::Result<()> {
        self.backends
            .remove(&id)
            .context("deleting from BACKENDS_V1")
    }
    fn new_counters(&mut self, kind: CounterKind, id: u32) -> anyhow::Result<()> {
        let zero =
            PerCpuValues::try_from(vec![Counter::default(); nr_cpus().map_err(|(_, e)| e)?])?;
        match kind {
            CounterKind::Frontend => self
                .svc_stats
                .insert(id, zero, 0)
                .context("creating SVC_STATS_V1 entry"),
            CounterKind::Backend => self
                .backend_stats
                .insert(id, zero, 0)
                .context("creating BACKEND_STATS_V1 entry"),
        }
    }
    fn del_counters(&mut self, kind: CounterKind, id: u32) -> anyhow::Result<()> {
        let r = match kind {
            CounterKind::Frontend => self.svc_stats.remove(&id),
            CounterKind::Backend => self.backend_stats.remove(&id),
        };
        // Already gone (an older agent's state without counters) is fine.
        match r {
            Err(aya::maps::MapError::KeyNotFound) | Ok(()) => Ok(()),
            Err(e) => Err(e).context("deleting a counter entry"),
        }
    }
    fn capacity(&self) -> Capacity {
        self.cap
    }
}

/// What one reconcile pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    /// `SERVICES_V1` entries written (new or changed).
    pub services_written: usize,
    /// `SERVICES_V1` entries removed.
    pub services_deleted: usize,
    /// `BACKENDS_V1` entries written.
    pub backends_written: usize,
    /// `BACKENDS_V1` entries removed.
    pub backends_deleted: usize,
    /// Frontends not (fully) programmed, and why.
    pub errors: Vec<String>,
    /// Frontends left out as a whole because a map is full (their Service, from the desired
    /// state, gets told), and why.
    pub skipped: Vec<(FrontendKey, String)>,
}

/// Keeps the maps equal to the desired state, writing only differences.
pub struct Reconciler<M: DatapathMaps> {
    maps: M,
    current: Rendered,
    frontend_ids: IdMap<FrontendKey>,
    backend_ids: IdMap<BackendRef>,
}

impl<M: DatapathMaps> Reconciler<M> {
    /// Adopts whatever the maps hold (a previous agent's state): ids are rebuilt from them, so
    /// unchanged entries are not rewritten by the first pass.
    pub fn adopt(maps: M) -> anyhow::Result<Self> {
        let services = maps.services()?;
        let backends = maps.backends()?;
        let mut frontend_ids = IdMap::default();
        let mut backend_ids = IdMap::default();
        for (k, v) in &services {
            if let Some(fk) = frontend_of(k).filter(|_| k.slot == 0) {
                frontend_ids.adopt(fk, v.id);
            }
        }
        for (id, b) in &backends {
            backend_ids.adopt((ip_of(&b.addr, b.family), b.port.to_host()), *id);
        }
        let current = Rendered {
            services,
            backends,
            skipped: Vec::new(),
        };
        Ok(Self {
            maps,
            current,
            frontend_ids,
            backend_ids,
        })
    }

    /// What the maps hold, as far as this reconciler knows.
    #[must_use]
    pub fn current(&self) -> &Rendered {
        &self.current
    }

    /// Makes the maps match `desired`: backends first, then backend slots, then frontend
    /// entries, then removals in reverse (frontend entries, stale slots, unused backends).
    pub fn apply(&mut self, desired: &DesiredState) -> ReconcileReport {
        let want = render(
            desired,
            &mut self.frontend_ids,
            &mut self.backend_ids,
            self.maps.capacity(),
        );
        let mut report = ReconcileReport {
            errors: want
                .skipped
                .iter()
                .map(|(k, why)| format!("frontend {k} not programmed: {why}"))
                .collect(),
            skipped: want.skipped.clone(),
            ..ReconcileReport::default()
        };
        self.write_backends(&want, &mut report);
        let broken = self.write_services(&want, &mut report);
        self.remove_services(&want, &broken, &mut report);
        self.remove_backends(&want, &mut report);
        report
    }

    /// Step 1: backends that are new or changed (a new id gets its counters first, so its first
    /// packet is counted).
    fn write_backends(&mut self, want: &Rendered, report: &mut ReconcileReport) {
        for (id, b) in &want.backends {
            if self.current.backends.get(id) == Some(b) {
                continue;
            }
            if !self.current.backends.contains_key(id)
                && let Err(e) = self.maps.new_counters(CounterKind::Backend, *id)
            {
                report.errors.push(format!("backend {id} counters: {e:#}"));
            }
            match self.maps.put_backend(*id, b) {
                Ok(()) => {
                    self.current.backends.insert(*id, *b);
                    report.backends_written += 1;
                }
                Err(e) => report.errors.push(format!("backend {id}: {e:#}")),
            }
        }
    }

    /// Steps 2 and 3: backend slots, then frontend entries. A frontend with a failed slot (or a slot
    /// naming a backend that could not be written) keeps its old slot 0; those frontends are
    /// returned, so their stale slots are kept too.
    fn write_services(
        &mut self,
        want: &Rendered,
        report: &mut ReconcileReport,
    ) -> BTreeSet<ServiceKey> {
        let mut broken = BTreeSet::new();
        for slot_pass in [true, false] {
            for (k, v) in &want.services {
                if (k.slot != 0) != slot_pass || self.current.services.get(k) == Some(v) {
                    continue;
                }
                let frontend = ServiceKey { slot: 0, ..*k };
                if !slot_pass && broken.contains(&frontend) {
                    continue;
                }
                if slot_pass && !self.current.backends.contains_key(&v.id) {
                    broken.insert(frontend);
                    continue;
                }
                let new_frontend = !slot_pass && !self.current.services.contains_key(k);
                if new_frontend && let Err(e) = self.maps.new_counters(CounterKind::Frontend, v.id)
                {
                    report
                        .errors
                        .push(format!("{} counters: {e:#}", describe(k)));
                }
                match self.maps.put_service(k, v) {
                    Ok(()) => {
                        self.current.services.insert(*k, *v);
                        report.services_written += 1;
                    }
                    Err(e) => {
                        broken.insert(frontend);
                        report.errors.push(format!("{}: {e:#}", describe(k)));
                    }
                }
            }
        }
        broken
    }

    /// Step 4: frontend entries no longer wanted (with their counters), then stale slots.
    fn remove_services(
        &mut self,
        want: &Rendered,
        broken: &BTreeSet<ServiceKey>,
        report: &mut ReconcileReport,
    ) {
        for slot_pass in [false, true] {
            let stale: Vec<ServiceKey> = self
                .current
                .services
                .keys()
                .filter(|k| (k.slot != 0) == slot_pass && !want.services.contains_key(k))
                .filter(|k| !broken.contains(&ServiceKey { slot: 0, ..**k }))
                .copied()
                .collect();
            for k in stale {
                if let Err(e) = self.maps.del_service(&k) {
                    report.errors.push(format!("{}: {e:#}", describe(&k)));
                    continue;
                }
                report.services_deleted += 1;
                let removed = self.current.services.remove(&k);
                let Some(v) = removed.filter(|_| k.slot == 0) else {
                    continue;
                };
                if let Err(e) = self.maps.del_counters(CounterKind::Frontend, v.id) {
                    report
                        .errors
                        .push(format!("{} counters: {e:#}", describe(&k)));
                }
            }
        }
    }

    /// Step 5: backends no slot names any more and no frontend keeps (with their counters).
    fn remove_backends(&mut self, want: &Rendered, report: &mut ReconcileReport) {
        let referenced: BTreeSet<u32> = self
            .current
            .services
            .iter()
            .filter(|(k, _)| k.slot != 0)
            .map(|(_, v)| v.id)
            .collect();
        let unused: Vec<u32> = self
            .current
            .backends
            .keys()
            .filter(|id| !want.backends.contains_key(id) && !referenced.contains(id))
            .copied()
            .collect();
        for id in unused {
            if let Err(e) = self.maps.del_backend(id) {
                report.errors.push(format!("backend {id}: {e:#}"));
                continue;
            }
            self.current.backends.remove(&id);
            report.backends_deleted += 1;
            if let Err(e) = self.maps.del_counters(CounterKind::Backend, id) {
                report.errors.push(format!("backend {id} counters: {e:#}"));
            }
        }
    }
}

fn ip_of(addr: &[u8; 16], family: u8) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::V4(Ipv4Addr::from(to_v4(addr)))
    } else {
        IpAddr::V6(Ipv6Addr::from(*addr))
    }
}

fn frontend_of(k: &ServiceKey) -> Option<FrontendKey> {
    Some(FrontendKey {
        addr: ip_of(&k.addr, k.family),
        port: k.port.to_host(),
        proto: match k.proto {
            ipproto::TCP => Protocol::Tcp,
            ipproto::UDP => Protocol::Udp,
            ipproto::SCTP => Protocol::Sctp,
            _ => return None,
        },
        scope: if k.scope == scope::EXTERNAL {
            Scope::External
        } else {
            Scope::Internal
        },
    })
}

fn describe(k: &ServiceKey) -> String {
    match frontend_of(k) {
        Some(f) if k.slot == 0 => format!("frontend {f}"),
        Some(f) => format!("frontend {f} slot {}", k.slot),
        None => format!("{k:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Backend as MBackend, EmptyAction, Frontend, ServicePortRef};

    /// In-memory maps recording every write, for order and minimality checks.
    #[derive(Default)]
    struct FakeMaps {
        services: BTreeMap<ServiceKey, ServiceValue>,
        backends: BTreeMap<u32, Backend>,
        log: Vec<String>,
        fail_slot: Option<u16>,
        cap: Option<Capacity>,
        /// (is backend, id) of every counter entry that exists.
        counters: BTreeSet<(bool, u32)>,
    }

    impl DatapathMaps for FakeMaps {
        fn services(&self) -> anyhow::Result<BTreeMap<ServiceKey, ServiceValue>> {
            Ok(self.services.clone())
        }
        fn backends(&self) -> anyhow::Result<BTreeMap<u32, Backend>> {
            Ok(self.backends.clone())
        }
        fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> anyhow::Result<()> {
            if Some(key.slot) == self.fail_slot {
                anyhow::bail!("E2BIG");
            }
            // Invariant checked on every write: a slot names an existing backend, and a
            // frontend's count only names existing slots.
            if key.slot != 0 {
                assert!(
                    self.backends.contains_key(&value.id),
                    "slot written before its backend"
                );
            } else {
                for s in 1..=value.count {
                    assert!(
                        self.services.contains_key(&ServiceKey { slot: s, ..*key }),
                        "count names a missing slot"
                    );
                }
            }
            self.log
                .push(format!("put slot {} id {}", key.slot, value.id));
            self.services.insert(*key, *value);
            Ok(())
        }
        fn del_service(&mut self, key: &ServiceKey) -> anyhow::Result<()> {
            if let Some(f) = self
                .services
                .get(&ServiceKey { slot: 0, ..*key })
                .filter(|_| key.slot != 0)
            {
                {
                    assert!(
                        key.slot > f.count,
                        "slot {} removed while its frontend counts it",
                        key.slot
                    );
                }
            }
            self.log.push(format!("del slot {}", key.slot));
            self.services.remove(key);
            Ok(())
        }
        fn put_backend(&mut self, id: u32, value: &Backend) -> anyhow::Result<()> {
            self.log.push(format!("put backend {id}"));
            self.backends.insert(id, *value);
            Ok(())
        }
        fn del_backend(&mut self, id: u32) -> anyhow::Result<()> {
            assert!(
                !self.services.iter().any(|(k, v)| k.slot != 0 && v.id == id),
                "backend {id} removed while a slot names it"
            );
            self.log.push(format!("del backend {id}"));
            self.backends.remove(&id);
            Ok(())
        }
        fn new_counters(&mut self, kind: CounterKind, id: u32) -> anyhow::Result<()> {
            assert!(
                self.counters.insert((kind == CounterKind::Backend, id)),
                "counters {kind:?} {id} created twice"
            );
            Ok(())
        }
        fn del_counters(&mut self, kind: CounterKind, id: u32) -> anyhow::Result<()> {
            assert!(
                self.counters.remove(&(kind == CounterKind::Backend, id)),
                "counters {kind:?} {id} deleted but never created"
            );
            Ok(())
        }
        fn capacity(&self) -> Capacity {
            self.cap.unwrap_or(Capacity {
                services: 1000,
                backends: 1000,
            })
        }
    }

    fn state(frontends: &[(&str, &[&str])]) -> DesiredState {
        let mut d = DesiredState::default();
        for (vip, backends) in frontends {
            d.frontends.insert(
                FrontendKey {
                    addr: vip.parse().unwrap(),
                    port: 80,
                    proto: Protocol::Tcp,
                    scope: Scope::Internal,
                },
                Frontend {
                    service: ServicePortRef {
                        namespace: "default".into(),
                        name: (*vip).into(),
                        port_name: String::new(),
                    },
                    affinity_timeout: None,
                    local_only: false,
                    backends: backends
                        .iter()
                        .map(|b| MBackend {
                            addr: b.parse().unwrap(),
                            port: 5000,
                            local: false,
                            terminating: false,
                        })
                        .collect(),
                    kept_backends: vec![],
                    on_empty: EmptyAction::Reject,
                },
            );
        }
        d
    }

    #[test]
    fn programs_then_changes_only_what_differs() {
        let mut r = Reconciler::adopt(FakeMaps::default()).unwrap();
        let first = r.apply(&state(&[
            ("198.19.0.10", &["198.18.1.10", "198.18.2.10"]),
            ("198.19.0.11", &["198.18.1.11"]),
        ]));
        assert_eq!((first.services_written, first.backends_written), (5, 3));
        assert_eq!(
            r.maps.counters.len(),
            5,
            "2 frontends + 3 backends get counters"
        );
        assert!(first.errors.is_empty());
        // Unchanged: nothing written.
        let again = r.apply(&state(&[
            ("198.19.0.10", &["198.18.1.10", "198.18.2.10"]),
            ("198.19.0.11", &["198.18.1.11"]),
        ]));
        assert_eq!(again, ReconcileReport::default());
        // One service loses a backend: the other service is not touched.
        r.maps.log.clear();
        let shrink = r.apply(&state(&[
            ("198.19.0.10", &["198.18.1.10"]),
            ("198.19.0.11", &["198.18.1.11"]),
        ]));
        assert_eq!(
            (
                shrink.services_written,
                shrink.services_deleted,
                shrink.backends_deleted
            ),
            (1, 1, 1)
        );
        assert_eq!(
            r.maps.log,
            ["put slot 0 id 1", "del slot 2", "del backend 2"]
        );
    }

    #[test]
    fn removing_a_service_removes_frontend_before_slots_and_backends() {
        let mut r = Reconciler::adopt(FakeMaps::default()).unwrap();
        r.apply(&state(&[("198.19.0.10", &["198.18.1.10", "198.18.2.10"])]));
        r.maps.log.clear();
        let gone = r.apply(&state(&[]));
        assert_eq!((gone.services_deleted, gone.backends_deleted), (3, 2));
        assert_eq!(r.maps.log[0], "del slot 0");
        assert!(
            r.maps.counters.is_empty(),
            "counters outlived their ids: {:?}",
            r.maps.counters
        );
        assert!(r.maps.services.is_empty() && r.maps.backends.is_empty());
    }

    #[test]
    fn a_restarted_agent_adopts_the_maps_without_rewriting_them() {
        let mut r = Reconciler::adopt(FakeMaps::default()).unwrap();
        let d = state(&[
            ("198.19.0.10", &["198.18.1.10", "198.18.2.10"]),
            ("2001:db8:f::10", &["2001:db8:1::10"]),
        ]);
        r.apply(&d);
        let FakeMaps {
            services, backends, ..
        } = r.maps;
        let mut again = Reconciler::adopt(FakeMaps {
            services,
            backends,
            ..FakeMaps::default()
        })
        .unwrap();
        assert_eq!(
            again.apply(&d),
            ReconcileReport::default(),
            "no entry removed and re-added"
        );
    }

    #[test]
    fn a_failed_slot_write_leaves_the_frontend_consistent_and_others_programmed() {
        let maps = FakeMaps {
            fail_slot: Some(2),
            ..FakeMaps::default()
        };
        let mut r = Reconciler::adopt(maps).unwrap();
        let rep = r.apply(&state(&[
            ("198.19.0.10", &["198.18.1.10", "198.18.2.10"]),
            ("198.19.0.11", &["198.18.1.11"]),
        ]));
        assert_eq!(rep.errors.len(), 1, "{:?}", rep.errors);
        assert!(rep.errors[0].contains("198.19.0.10:80/TCP") && rep.errors[0].contains("slot 2"));
        let fe = |vip: &str| {
            r.maps
                .services
                .iter()
                .find(|(k, _)| {
                    k.slot == 0 && ip_of(&k.addr, k.family) == vip.parse::<IpAddr>().unwrap()
                })
                .map(|(_, v)| *v)
        };
        assert!(
            fe("198.19.0.10").is_none(),
            "half-programmed frontend exposed"
        );
        assert_eq!(fe("198.19.0.11").map(|v| v.count), Some(1));
    }
}
