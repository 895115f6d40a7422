//! Writing rendered state into the maps: only what changed, in an order that never lets a
//! program see a half-programmed frontend.
//!
//! Order: addresses (`ADDRS_V1`) the new entries need first, then backends, then backend slots,
//! then frontend entries (slot 0), then removals in reverse (frontend entries, stale slots,
//! unused backends, then addresses no entry has any more). A frontend whose slots could not
//! all be written keeps its old slot 0 (count), which only names slots that exist. Last, when
//! the pass ended `(frontend, backend)` pairs or removed backends, the kernel's flow state that
//! names them is cleared: UDP flows and affinity entries (one bounded pass over each table; see
//! `flows.rs`), by the sweeper thread when there is one (`sweeper.rs`: the pass only queues
//! it), inline otherwise; and what ended is handed, as addresses, to the thread that destroys connected
//! UDP sockets translated to it (`sockets`), which the pass does not wait for.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use super::{
    flows::{ReplySchedule, StaleFlows, Sweep},
    ids::IdMap,
    names,
    render::{BackendRef, Capacity, Rendered, addresses, addresses_union, render},
    sweeper::{FlowSweeps, FlowTables, Sweeper, clear_now, clear_replies_now},
};
use crate::{
    model::{DesiredState, FrontendKey, Protocol, Scope},
    sockets::{EndedBackends, EndedSender},
};
use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData, MapError, PerCpuHashMap, PerCpuValues},
    util::nr_cpus,
};
use svc_common::{
    addr::{FAMILY_V4, to_v4},
    addrs::{AddrKey, AddrValue, addr_flags},
    ids::{self, IdCursor},
    net::ipproto,
    service::{Backend, BackendName, ServiceKey, ServiceValue, scope},
    stats::Counter,
};

/// Access to `SERVICES_V1` and `BACKENDS_V1` (written by the agent), the counters, and the
/// kernel's flow state (`CT_V1`, `AFFINITY_V1`: the agent only deletes from those).
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
    /// Every entry of `ADDRS_V1`.
    fn addrs(&self) -> anyhow::Result<BTreeMap<AddrKey, AddrValue>>;
    /// Writes one `ADDRS_V1` entry.
    fn put_addr(&mut self, key: &AddrKey, value: &AddrValue) -> anyhow::Result<()>;
    /// Removes one `ADDRS_V1` entry.
    fn del_addr(&mut self, key: &AddrKey) -> anyhow::Result<()>;
    /// Creates (or zeroes) the counters of a frontend or backend id.
    fn new_counters(&mut self, kind: CounterKind, id: u32) -> anyhow::Result<()>;
    /// Removes the counters of a frontend or backend id.
    fn del_counters(&mut self, kind: CounterKind, id: u32) -> anyhow::Result<()>;
    /// How many entries each map holds at most.
    fn capacity(&self) -> Capacity;
    /// Deletes the `CT_V1` forward entries of UDP flows that `stale` names, in one pass that
    /// reads at most the table's capacity in entries (see `flows.rs`).
    fn clear_udp_flows(&mut self, stale: &StaleFlows) -> anyhow::Result<Sweep>;
    /// Deletes the `CT_V1` reply entries of UDP flows that `stale` names (a grace after their
    /// forward entries: `flows::ReplySchedule`), in one pass bounded the same way.
    fn clear_udp_replies(&mut self, stale: &StaleFlows) -> anyhow::Result<Sweep>;
    /// Deletes the `AFFINITY_V1` entries that `stale` names, in one pass bounded the same way.
    fn clear_affinity(&mut self, stale: &StaleFlows) -> anyhow::Result<Sweep>;
    /// Deletes the `SOCK_UDP_PIN_V1` entries that `stale` names, in one pass bounded the same
    /// way.
    fn clear_sock_pins(&mut self, stale: &StaleFlows) -> anyhow::Result<Sweep>;
    /// The id cursors kept in `ID_CURSORS_V1` (frontends, backends; 0: none kept).
    fn id_cursors(&self) -> anyhow::Result<[u32; 2]>;
    /// Keeps the id cursors (frontends, backends) in `ID_CURSORS_V1`.
    fn put_id_cursors(&mut self, cursors: [u32; 2]) -> anyhow::Result<()>;
    /// Every `BACKEND_NAMES_V1` entry.
    fn backend_names(&self) -> anyhow::Result<BTreeMap<u32, BackendName>>;
    /// Writes a backend's name.
    fn put_backend_name(&mut self, id: u32, name: &BackendName) -> anyhow::Result<()>;
    /// Deletes a backend's name (absent is fine).
    fn del_backend_name(&mut self, id: u32) -> anyhow::Result<()>;
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
    addrs: BpfHashMap<MapData, AddrKey, AddrValue>,
    svc_stats: PerCpuHashMap<MapData, u32, Counter>,
    backend_stats: PerCpuHashMap<MapData, u32, Counter>,
    /// `CT_V1`, `CT_NEW_V1`, `AFFINITY_V1`, `SOCK_UDP_PIN_V1`.
    flows: FlowTables,
    names: BpfHashMap<MapData, u32, BackendName>,
    id_cursors: aya::maps::Array<MapData, IdCursor>,
    cap: Capacity,
}

impl AyaMaps {
    /// The flow tables (`CT_V1`, `CT_NEW_V1`, `AFFINITY_V1`, `SOCK_UDP_PIN_V1`) through
    /// descriptors of their own, for the thread that clears them off the pass ([`Sweeper`]).
    ///
    /// # Errors
    /// When a descriptor cannot be duplicated.
    pub fn flow_tables(&self) -> anyhow::Result<FlowTables> {
        self.flows.try_clone()
    }

    /// Takes `SERVICES_V1`, `BACKENDS_V1`, `ADDRS_V1`, their counters, `CT_V1` and
    /// `AFFINITY_V1` out of `ebpf` (the programs keep using them).
    pub fn take(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        let (services, svc_max) = take_hash(ebpf, "SERVICES_V1")?;
        let (backends, be_max) = take_hash(ebpf, "BACKENDS_V1")?;
        let (addrs, _) = take_hash(ebpf, "ADDRS_V1")?;
        let flows = FlowTables::take(ebpf)?;
        let (names, _) = take_hash(ebpf, "BACKEND_NAMES_V1")?;
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
            addrs: BpfHashMap::try_from(addrs).context("ADDRS_V1")?,
            svc_stats: take_stats(ebpf, "SVC_STATS_V1")?,
            backend_stats: take_stats(ebpf, "BACKEND_STATS_V1")?,
            flows,
            names: BpfHashMap::try_from(names).context("BACKEND_NAMES_V1")?,
            id_cursors: aya::maps::Array::try_from(
                ebpf.take_map("ID_CURSORS_V1")
                    .ok_or_else(|| anyhow!("no map ID_CURSORS_V1 in the object"))?,
            )
            .context("ID_CURSORS_V1")?,
            cap: Capacity {
                services: svc_max,
                backends: be_max,
            },
        })
    }
}

/// Takes a hash map (plain or LRU) out of `ebpf`, with its size.
fn take_hash(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<(aya::maps::Map, u32)> {
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("no map {name} in the object"))?;
    let (aya::maps::Map::HashMap(data) | aya::maps::Map::LruHashMap(data)) = &map else {
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
    fn addrs(&self) -> anyhow::Result<BTreeMap<AddrKey, AddrValue>> {
        self.addrs
            .iter()
            .map(|r| r.context("reading ADDRS_V1"))
            .collect()
    }
    fn put_addr(&mut self, key: &AddrKey, value: &AddrValue) -> anyhow::Result<()> {
        self.addrs.insert(key, value, 0).context("writing ADDRS_V1")
    }
    fn del_addr(&mut self, key: &AddrKey) -> anyhow::Result<()> {
        self.addrs.remove(key).context("deleting from ADDRS_V1")
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
    fn clear_udp_flows(&mut self, stale: &StaleFlows) -> anyhow::Result<Sweep> {
        self.flows.clear_udp_flows(stale)
    }
    fn clear_udp_replies(&mut self, stale: &StaleFlows) -> anyhow::Result<Sweep> {
        self.flows.clear_udp_replies(stale)
    }
    fn clear_affinity(&mut self, stale: &StaleFlows) -> anyhow::Result<Sweep> {
        self.flows.clear_affinity(stale)
    }
    fn clear_sock_pins(&mut self, stale: &StaleFlows) -> anyhow::Result<Sweep> {
        self.flows.clear_sock_pins(stale)
    }
    fn id_cursors(&self) -> anyhow::Result<[u32; 2]> {
        let get = |i| {
            self.id_cursors
                .get(&i, 0)
                .map(|c| c.next)
                .context("reading ID_CURSORS_V1")
        };
        Ok([get(ids::FRONTEND)?, get(ids::BACKEND)?])
    }
    fn put_id_cursors(&mut self, cursors: [u32; 2]) -> anyhow::Result<()> {
        for (i, next) in [ids::FRONTEND, ids::BACKEND].into_iter().zip(cursors) {
            self.id_cursors
                .set(i, IdCursor { next }, 0)
                .context("writing ID_CURSORS_V1")?;
        }
        Ok(())
    }
    fn backend_names(&self) -> anyhow::Result<BTreeMap<u32, BackendName>> {
        self.names
            .iter()
            .map(|r| r.context("reading BACKEND_NAMES_V1"))
            .collect()
    }
    fn put_backend_name(&mut self, id: u32, name: &BackendName) -> anyhow::Result<()> {
        self.names
            .insert(id, name, 0)
            .context("writing BACKEND_NAMES_V1")
    }
    fn del_backend_name(&mut self, id: u32) -> anyhow::Result<()> {
        match self.names.remove(&id) {
            Err(MapError::KeyNotFound) | Ok(()) => Ok(()),
            Err(e) => Err(e).context("deleting from BACKEND_NAMES_V1"),
        }
    }
}

/// The maps' own clearing passes, for the pass that clears inline (no sweeper).
struct InlineSweeps<'a, M>(&'a mut M);

impl<M: DatapathMaps> FlowSweeps for InlineSweeps<'_, M> {
    fn clear_udp_flows(&mut self, stale: &StaleFlows) -> anyhow::Result<Sweep> {
        self.0.clear_udp_flows(stale)
    }
    fn clear_udp_replies(&mut self, stale: &StaleFlows) -> anyhow::Result<Sweep> {
        self.0.clear_udp_replies(stale)
    }
    fn clear_affinity(&mut self, stale: &StaleFlows) -> anyhow::Result<Sweep> {
        self.0.clear_affinity(stale)
    }
    fn clear_sock_pins(&mut self, stale: &StaleFlows) -> anyhow::Result<Sweep> {
        self.0.clear_sock_pins(stale)
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
    /// Kernel flow state cleared because the pass ended `(frontend, backend)` pairs or removed
    /// backends; `None` when it ended none.
    pub cleared: Option<Cleared>,
    /// Frontends not (fully) programmed, and why.
    pub errors: Vec<String>,
    /// Frontends left out as a whole because a map is full (their Service, from the desired
    /// state, gets told), and why.
    pub skipped: Vec<(FrontendKey, String)>,
    /// The pass over `CT_V1` that cleared the reply entries of UDP flows an earlier pass (at
    /// least [`UDP_REPLY_GRACE`] ago) cleared; `None` when none were due (or it failed).
    pub udp_replies: Option<Sweep>,
}

/// What a reconcile pass cleared from `CT_V1` and `AFFINITY_V1` (see `flows.rs`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Cleared {
    /// Backends the pass removed from `BACKENDS_V1`.
    pub removed_backends: usize,
    /// `(frontend, backend)` pairs the pass ended (a backend left a frontend, or the frontend
    /// went away), including those of removed backends.
    pub ended_pairs: usize,
    /// The pass over `CT_V1`; `None` when no UDP frontend was concerned (TCP flows are never
    /// cleared) or when it failed (see the report's errors).
    pub udp: Option<Sweep>,
    /// The pass over `AFFINITY_V1`; `None` when it failed.
    pub affinity: Option<Sweep>,
    /// The pass over `SOCK_UDP_PIN_V1`; `None` when no UDP frontend was concerned or when it
    /// failed.
    pub sock_pins: Option<Sweep>,
}

/// How long the address of a backend that left `BACKENDS_V1` keeps its `BACKEND` flag in
/// `ADDRS_V1`: replies already on their way (a TCP answer to a request sent just before the
/// removal) still get the service address back, as their reply entries say. The flag goes at
/// the first pass after that.
pub const RETIRED_BACKEND_GRACE: Duration = Duration::from_mins(1);

/// How long the reply entries of the UDP flows a pass clears outlive their forward entries
/// (`flows::ReplySchedule`): replies already on their way still leave with the service
/// address. They go at the first pass after that.
pub const UDP_REPLY_GRACE: Duration = Duration::from_secs(2);

/// Keeps the maps equal to the desired state, writing only differences.
pub struct Reconciler<M: DatapathMaps> {
    maps: M,
    current: Rendered,
    frontend_ids: IdMap<FrontendKey>,
    backend_ids: IdMap<BackendRef>,
    /// Where ended backends go for their connected UDP sockets to be destroyed (`sockets`).
    ended: Option<EndedSender>,
    /// What `ADDRS_V1` holds, as far as this reconciler knows.
    addrs: BTreeMap<AddrKey, AddrValue>,
    /// Addresses that are no backend's any more but keep the `BACKEND` flag until their grace
    /// ([`RETIRED_BACKEND_GRACE`], from the instant in the value) ends.
    retired: BTreeMap<AddrKey, Instant>,
    retired_grace: Duration,
    /// Reply entries of cleared UDP flows, waiting for their grace.
    replies: ReplySchedule,
    /// The id cursors last kept in `ID_CURSORS_V1`.
    cursors: [u32; 2],
    /// The thread that clears flow state off the pass; `None`: the pass clears it.
    sweeper: Option<Sweeper>,
}

impl<M: DatapathMaps> Reconciler<M> {
    /// Adopts whatever the maps hold (a previous agent's state): ids are rebuilt from them, so
    /// unchanged entries are not rewritten by the first pass. `ADDRS_V1` is brought in line
    /// with the adopted `SERVICES_V1` and `BACKENDS_V1` at once (an older agent may not have
    /// kept it, or kept none): the programs test it first, so it must be right before they are
    /// attached.
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
        // Go on after the highest id any agent issued, not the highest the maps still hold.
        let cursors = maps.id_cursors()?;
        frontend_ids.resume_at(cursors[0]);
        backend_ids.resume_at(cursors[1]);
        // Backends kept only for established flows are in no slot: which frontend keeps them
        // is not in the maps. Should one of them leave its frontend while another still uses
        // it, that frontend's UDP flows to it stay (they end when idle); removed backends are
        // cleared whatever frontend names them.
        let reachable = slot_pairs(&services);
        let addrs = maps.addrs()?;
        let current = Rendered {
            services,
            backends,
            reachable,
            skipped: Vec::new(),
            names: maps.backend_names()?,
        };
        let mut r = Self {
            maps,
            current,
            frontend_ids,
            backend_ids,
            ended: None,
            addrs,
            retired: BTreeMap::new(),
            retired_grace: RETIRED_BACKEND_GRACE,
            replies: ReplySchedule::new(UDP_REPLY_GRACE),
            cursors,
            sweeper: None,
        };
        let want = r.addresses_now();
        let mut errors = Vec::new();
        r.sync_addrs(&want, true, &mut errors);
        if !errors.is_empty() {
            return Err(anyhow!("rebuilding ADDRS_V1: {}", errors.join("; ")));
        }
        Ok(r)
    }

    /// How long the reply entries of cleared UDP flows outlive their forward entries from now
    /// on ([`UDP_REPLY_GRACE`] unless changed; tests shorten it).
    pub fn set_udp_reply_grace(&mut self, grace: Duration) {
        self.replies.set_grace(grace);
    }

    /// From now on, flow state that a pass ends is cleared by a thread of its own over `tables`
    /// (see `sweeper.rs`): the pass only queues it. Reply entries of cleared UDP flows go the
    /// grace set by [`set_udp_reply_grace`](Self::set_udp_reply_grace) (call that first) after
    /// their flows, when the thread wakes for them.
    ///
    /// # Errors
    /// When the thread cannot be started.
    pub fn sweep_in_background(
        &mut self,
        tables: impl FlowSweeps + Send + 'static,
    ) -> anyhow::Result<()> {
        self.sweeper = Some(Sweeper::start(tables, self.replies.grace())?);
        Ok(())
    }

    /// From now on, every pass that ends backends also sends them, as addresses, to `sender`
    /// (the thread that destroys connected UDP sockets translated to them; see `sockets`).
    /// Sending never blocks: the pass does not wait for the sockets.
    pub fn send_ended_to(&mut self, sender: EndedSender) {
        self.ended = Some(sender);
    }

    /// What the maps hold, as far as this reconciler knows.
    #[must_use]
    pub fn current(&self) -> &Rendered {
        &self.current
    }

    /// Makes the maps match `desired`: backends first, then backend slots, then frontend
    /// entries, then removals in reverse (frontend entries, stale slots, unused backends);
    /// last, when that ended `(frontend, backend)` pairs or removed backends, clears the UDP
    /// flows and affinity entries that name them (see `flows.rs`).
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
        // Before any new id reaches a map: a restart after this pass goes on after them.
        self.keep_id_cursors(&mut report.errors);
        let reachable_before = std::mem::take(&mut self.current.reachable);
        let mut frontends = frontend_keys(&self.current.services);
        frontends.extend(frontend_keys(&want.services));
        let before = addresses(&self.current.services, &self.current.backends);
        let needed = addresses_union(&before, &addresses(&want.services, &want.backends));
        self.sync_addrs(&needed, false, &mut report.errors);
        self.write_backends(&want, &mut report);
        let broken = self.write_services(&want, &mut report);
        self.remove_services(&want, &broken, &mut report);
        let removed = self.remove_backends(&want, &mut report);
        let after = self.addresses_now();
        self.sync_addrs(&after, true, &mut report.errors);
        let maps = std::cell::RefCell::new(&mut self.maps);
        names::sync(
            &mut self.current.names,
            &want.names,
            |id, name| maps.borrow_mut().put_backend_name(id, name),
            |id| maps.borrow_mut().del_backend_name(id),
            &mut report.errors,
        );
        // Slots kept for a frontend that could not be reprogrammed still send new flows.
        self.current.reachable = &want.reachable | &slot_pairs(&self.current.services);
        if self.sweeper.is_some() {
            self.revived(StaleFlows {
                pairs: &self.current.reachable - &reachable_before,
                backends: BTreeSet::new(),
            });
        }
        let stale = StaleFlows {
            pairs: &reachable_before - &self.current.reachable,
            backends: removed.keys().copied().collect(),
        };
        if !stale.is_empty() {
            let udp = concerns_udp(&stale, &reachable_before, &frontends);
            report.cleared = Some(self.clear_stale(&stale, udp, &mut report.errors));
            if let Some(sender) = &self.ended {
                sender.send(ended_backends(
                    &stale,
                    &frontends,
                    &self.current.backends,
                    &removed,
                ));
            }
        }
        self.clear_due_replies(&mut report);
        report
    }

    /// Writes the id cursors to `ID_CURSORS_V1` when rendering moved them.
    fn keep_id_cursors(&mut self, errors: &mut Vec<String>) {
        let now = [self.frontend_ids.cursor(), self.backend_ids.cursor()];
        if now == self.cursors {
            return;
        }
        match self.maps.put_id_cursors(now) {
            Ok(()) => self.cursors = now,
            Err(e) => errors.push(format!(
                "keeping the id cursors (a restart may reissue ids freed since): {e:#}"
            )),
        }
    }

    /// Clears the reply entries of UDP flows cleared at least the grace ago (see
    /// `flows::ReplySchedule`), except those of a pair or backend that came back meanwhile.
    /// With a sweeper, the thread does this when they are due.
    fn clear_due_replies(&mut self, report: &mut ReconcileReport) {
        let Some(mut due) = self.replies.take_due(Instant::now()) else {
            return;
        };
        due.pairs.retain(|p| !self.current.reachable.contains(p));
        due.backends
            .retain(|id| !self.current.backends.contains_key(id));
        if due.is_empty() {
            return;
        }
        let grace = self.replies.grace();
        report.udp_replies = clear_replies_now(
            &mut InlineSweeps(&mut self.maps),
            &due,
            grace,
            &mut report.errors,
        );
    }

    /// Step 6: forgets the UDP flows (when `udp`) and affinity entries that name what `stale`
    /// says ended, one bounded pass over each table; logs what it did.
    ///
    /// With a sweeper, only queues the work (the returned counts are then `None`) and tells it
    /// what `revived` says is reachable again.
    fn clear_stale(&mut self, stale: &StaleFlows, udp: bool, errors: &mut Vec<String>) -> Cleared {
        if let Some(sweeper) = &self.sweeper {
            sweeper.ended(stale.clone(), udp);
            return Cleared {
                removed_backends: stale.backends.len(),
                ended_pairs: stale.pairs.len(),
                ..Cleared::default()
            };
        }
        clear_now(
            &mut InlineSweeps(&mut self.maps),
            stale,
            udp,
            &mut self.replies,
            errors,
        )
    }

    /// Tells the sweeper (if any) that these pairs are reachable and these backends exist
    /// again, so what an earlier pass queued for them is not cleared.
    fn revived(&self, back: StaleFlows) {
        if let Some(sweeper) = &self.sweeper {
            sweeper.revived(back);
        }
    }

    /// What `ADDRS_V1` should hold now: the addresses of what `SERVICES_V1` and `BACKENDS_V1`
    /// hold, plus the `BACKEND` flag of addresses whose last backend left less than
    /// [`RETIRED_BACKEND_GRACE`] ago (an address flagged in the map but no backend's starts
    /// its grace now).
    fn addresses_now(&mut self) -> BTreeMap<AddrKey, AddrValue> {
        let mut want = addresses(&self.current.services, &self.current.backends);
        let now = Instant::now();
        let is_backend = |m: &BTreeMap<AddrKey, AddrValue>, k: &AddrKey| {
            m.get(k).is_some_and(|v| v.flags & addr_flags::BACKEND != 0)
        };
        for k in self.addrs.keys() {
            if is_backend(&self.addrs, k) && !is_backend(&want, k) {
                self.retired.entry(*k).or_insert(now);
            }
        }
        let grace = self.retired_grace;
        self.retired
            .retain(|k, since| !is_backend(&want, k) && now.duration_since(*since) < grace);
        for k in self.retired.keys() {
            want.entry(*k).or_default().flags |= addr_flags::BACKEND;
        }
        want
    }

    /// Steps 0 and 7: writes the `ADDRS_V1` entries that differ from `want`; with `remove`,
    /// also removes the entries `want` does not have. An address whose write failed is not
    /// recorded, so the next pass tries again.
    fn sync_addrs(
        &mut self,
        want: &BTreeMap<AddrKey, AddrValue>,
        remove: bool,
        errors: &mut Vec<String>,
    ) {
        for (k, v) in want {
            if self.addrs.get(k) == Some(v) {
                continue;
            }
            match self.maps.put_addr(k, v) {
                Ok(()) => {
                    self.addrs.insert(*k, *v);
                }
                Err(e) => errors.push(format!("address {}: {e:#}", ip_of(&k.addr, k.family))),
            }
        }
        if !remove {
            return;
        }
        let stale: Vec<AddrKey> = self
            .addrs
            .keys()
            .filter(|k| !want.contains_key(k))
            .copied()
            .collect();
        for k in stale {
            match self.maps.del_addr(&k) {
                Ok(()) => {
                    self.addrs.remove(&k);
                }
                Err(e) => errors.push(format!("address {}: {e:#}", ip_of(&k.addr, k.family))),
            }
        }
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
    /// Returns the backends removed.
    fn remove_backends(
        &mut self,
        want: &Rendered,
        report: &mut ReconcileReport,
    ) -> BTreeMap<u32, Backend> {
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
        let mut removed = BTreeMap::new();
        for id in unused {
            if let Err(e) = self.maps.del_backend(id) {
                report.errors.push(format!("backend {id}: {e:#}"));
                continue;
            }
            if let Some(b) = self.current.backends.remove(&id) {
                removed.insert(id, b);
            }
            report.backends_deleted += 1;
            if let Err(e) = self.maps.del_counters(CounterKind::Backend, id) {
                report.errors.push(format!("backend {id} counters: {e:#}"));
            }
        }
        removed
    }
}

/// `(frontend id, backend id)` of every backend slot in `services`.
fn slot_pairs(services: &BTreeMap<ServiceKey, ServiceValue>) -> BTreeSet<(u32, u32)> {
    services
        .iter()
        .filter(|(k, _)| k.slot != 0)
        .filter_map(|(k, v)| {
            let frontend = services.get(&ServiceKey { slot: 0, ..*k })?;
            Some((frontend.id, v.id))
        })
        .collect()
}

/// The key (slot 0) of each frontend id in `services`.
fn frontend_keys(services: &BTreeMap<ServiceKey, ServiceValue>) -> BTreeMap<u32, ServiceKey> {
    services
        .iter()
        .filter(|(k, _)| k.slot == 0)
        .map(|(k, v)| (v.id, *k))
        .collect()
}

/// What `stale` ended, as addresses: the pairs of UDP frontends (service address and port,
/// backend address and port) and every removed backend. A backend of a pair is in `backends`
/// (it left one frontend, others keep it) or in `removed`; one in neither is left out.
fn ended_backends(
    stale: &StaleFlows,
    frontends: &BTreeMap<u32, ServiceKey>,
    backends: &BTreeMap<u32, Backend>,
    removed: &BTreeMap<u32, Backend>,
) -> EndedBackends {
    let backend = |id: &u32| {
        let b = backends.get(id).or_else(|| removed.get(id))?;
        Some(SocketAddr::new(ip_of(&b.addr, b.family), b.port.to_host()))
    };
    EndedBackends {
        pairs: stale
            .pairs
            .iter()
            .filter_map(|(f, b)| {
                let k = frontends.get(f).filter(|k| k.proto == ipproto::UDP)?;
                let service = SocketAddr::new(ip_of(&k.addr, k.family), k.port.to_host());
                Some((service, backend(b)?))
            })
            .collect(),
        backends: removed.keys().filter_map(backend).collect(),
    }
}

/// Whether `stale` may name a UDP flow: an ended pair of a UDP frontend (or of one whose
/// protocol is not known), or a removed backend no known pair names (one kept for established
/// flows only, adopted from a previous agent's maps).
fn concerns_udp(
    stale: &StaleFlows,
    reachable_before: &BTreeSet<(u32, u32)>,
    frontends: &BTreeMap<u32, ServiceKey>,
) -> bool {
    let known: BTreeSet<u32> = reachable_before.iter().map(|(_, b)| *b).collect();
    stale
        .pairs
        .iter()
        .any(|(f, _)| frontends.get(f).is_none_or(|k| k.proto == ipproto::UDP))
        || stale.backends.iter().any(|b| !known.contains(b))
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
    use std::collections::HashMap;

    use svc_common::{
        Be16,
        affinity::{AffinityKey, AffinityValue},
        conntrack::{CtKey, CtValue, dir},
        sock::{SockPinKey, SockPinValue},
    };

    use super::super::flows::{FlowTable, is_flow, is_reply, sweep};

    use super::*;
    use crate::{
        datapath::render::map_addr,
        model::{Backend as MBackend, EmptyAction, Frontend, ServicePortRef},
    };

    /// In-memory maps recording every write, for order and minimality checks.
    #[derive(Default)]
    struct FakeMaps {
        services: BTreeMap<ServiceKey, ServiceValue>,
        backends: BTreeMap<u32, Backend>,
        addrs: BTreeMap<AddrKey, AddrValue>,
        log: Vec<String>,
        fail_slot: Option<u16>,
        cap: Option<Capacity>,
        /// (is backend, id) of every counter entry that exists.
        counters: BTreeSet<(bool, u32)>,
        /// `CT_V1` and `AFFINITY_V1`, as the kernel would have filled them.
        ct: HashMap<CtKey, CtValue>,
        affinity: HashMap<AffinityKey, AffinityValue>,
        sock_pins: HashMap<SockPinKey, SockPinValue>,
        names: BTreeMap<u32, BackendName>,
        /// Entries one pass reads at most (the capacity of the real tables).
        sweep_limit: Option<usize>,
        /// Passes over each table so far.
        ct_passes: usize,
        ct_reply_passes: usize,
        affinity_passes: usize,
        /// `ID_CURSORS_V1`.
        cursors: [u32; 2],
    }

    impl FakeMaps {
        /// The flags `ADDRS_V1` must have for `addr` given the entries the maps hold now.
        fn addr_users(&self, key: &AddrKey) -> u32 {
            let frontend = self
                .services
                .keys()
                .any(|k| k.slot == 0 && k.addr == key.addr && k.family == key.family);
            let backend = self
                .backends
                .values()
                .any(|b| b.addr == key.addr && b.family == key.family);
            u32::from(frontend) * addr_flags::FRONTEND + u32::from(backend) * addr_flags::BACKEND
        }

        /// Whether `ADDRS_V1` has `flag` for this address.
        fn addr_has(&self, addr: [u8; 16], family: u8, flag: u32) -> bool {
            let key = AddrKey {
                addr,
                family,
                _pad: [0; 3],
            };
            self.addrs.get(&key).is_some_and(|v| v.flags & flag != 0)
        }
    }

    /// A fake table: the same pass as the real maps, over a `HashMap`.
    struct FakeTable<'a, K, V>(&'a mut HashMap<K, V>);

    impl<K: Copy + Eq + std::hash::Hash, V: Copy> FlowTable<K, V> for FakeTable<'_, K, V> {
        type Error = std::convert::Infallible;
        fn entries(&self) -> impl Iterator<Item = Result<(K, V), Self::Error>> + '_ {
            self.0.iter().map(|(k, v)| Ok((*k, *v)))
        }
        fn get(&self, key: &K) -> Result<Option<V>, Self::Error> {
            Ok(self.0.get(key).copied())
        }
        fn remove(&mut self, key: &K) -> Result<bool, Self::Error> {
            Ok(self.0.remove(key).is_some())
        }
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
                assert!(
                    self.addr_has(key.addr, key.family, addr_flags::FRONTEND),
                    "frontend written before its address"
                );
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
            assert!(
                self.addr_has(value.addr, value.family, addr_flags::BACKEND),
                "backend {id} written before its address"
            );
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
        fn addrs(&self) -> anyhow::Result<BTreeMap<AddrKey, AddrValue>> {
            Ok(self.addrs.clone())
        }
        fn put_addr(&mut self, key: &AddrKey, value: &AddrValue) -> anyhow::Result<()> {
            let users = self.addr_users(key);
            assert_eq!(
                users & !value.flags,
                0,
                "address flags {:#x} dropped while entries use {users:#x}",
                value.flags
            );
            self.addrs.insert(*key, *value);
            Ok(())
        }
        fn del_addr(&mut self, key: &AddrKey) -> anyhow::Result<()> {
            assert_eq!(self.addr_users(key), 0, "address removed while in use");
            self.addrs.remove(key);
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
        fn clear_udp_flows(&mut self, stale: &StaleFlows) -> anyhow::Result<Sweep> {
            self.ct_passes += 1;
            let limit = self.sweep_limit.unwrap_or(usize::MAX);
            let Ok(done) = sweep(
                &mut FakeTable(&mut self.ct),
                limit,
                |k, v| stale.matches_ct(k, v) && is_flow(k, v),
                is_flow,
            );
            Ok(done)
        }
        fn clear_udp_replies(&mut self, stale: &StaleFlows) -> anyhow::Result<Sweep> {
            self.ct_reply_passes += 1;
            let limit = self.sweep_limit.unwrap_or(usize::MAX);
            let Ok(done) = sweep(
                &mut FakeTable(&mut self.ct),
                limit,
                |k, v| stale.matches_ct(k, v) && is_reply(k, v),
                |_, _| false,
            );
            Ok(done)
        }
        fn clear_affinity(&mut self, stale: &StaleFlows) -> anyhow::Result<Sweep> {
            self.affinity_passes += 1;
            let limit = self.sweep_limit.unwrap_or(usize::MAX);
            let Ok(done) = sweep(
                &mut FakeTable(&mut self.affinity),
                limit,
                |k, v| stale.matches_affinity(k, v),
                |_, _| true,
            );
            Ok(done)
        }
        fn clear_sock_pins(&mut self, stale: &StaleFlows) -> anyhow::Result<Sweep> {
            let limit = self.sweep_limit.unwrap_or(usize::MAX);
            let Ok(done) = sweep(
                &mut FakeTable(&mut self.sock_pins),
                limit,
                |_, v| stale.matches_sock_pin(v),
                |_, _| true,
            );
            Ok(done)
        }
        fn id_cursors(&self) -> anyhow::Result<[u32; 2]> {
            Ok(self.cursors)
        }
        fn put_id_cursors(&mut self, cursors: [u32; 2]) -> anyhow::Result<()> {
            self.cursors = cursors;
            Ok(())
        }
        fn backend_names(&self) -> anyhow::Result<BTreeMap<u32, BackendName>> {
            Ok(self.names.clone())
        }
        fn put_backend_name(&mut self, id: u32, name: &BackendName) -> anyhow::Result<()> {
            assert!(
                self.backends.contains_key(&id),
                "name written for a backend not in BACKENDS_V1"
            );
            self.names.insert(id, *name);
            Ok(())
        }
        fn del_backend_name(&mut self, id: u32) -> anyhow::Result<()> {
            self.names.remove(&id);
            Ok(())
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
                    unready_backends: vec![],
                    on_empty: EmptyAction::Reject,
                },
            );
        }
        d
    }

    #[test]
    fn backend_names_follow_their_backends_and_survive_a_restart() {
        let named = |names: &[(&str, &str)]| {
            let mut d = state(&[("198.19.0.10", &["198.18.1.10", "198.18.2.10"])]);
            for (addr, name) in names {
                d.backend_names
                    .insert(addr.parse().unwrap(), (*name).to_owned());
            }
            d
        };
        let shown =
            |maps: &FakeMaps| -> Vec<String> { maps.names.values().map(names::display).collect() };
        let mut r = Reconciler::adopt(FakeMaps::default()).unwrap();
        let d = named(&[
            ("198.18.1.10", "default/web-0"),
            ("198.18.9.9", "default/gone"),
        ]);
        assert!(r.apply(&d).errors.is_empty());
        assert_eq!(
            shown(&r.maps),
            ["default/web-0"],
            "only backends in the map get a name"
        );
        let r = Reconciler::adopt(r.maps).unwrap();
        let mut r = r;
        let d = named(&[("198.18.2.10", "default/web-1")]);
        assert!(r.apply(&d).errors.is_empty());
        assert_eq!(
            shown(&r.maps),
            ["default/web-1"],
            "web-0's name left with its entry"
        );
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
        assert_eq!(
            (r.maps.ct_passes, r.maps.affinity_passes),
            (0, 0),
            "nothing ended: no table is scanned"
        );
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
    fn addresses_follow_frontends_and_backends_and_are_rebuilt_on_adopt() {
        fn flags(maps: &FakeMaps, ip: &str) -> Option<u32> {
            let (addr, family) = map_addr(ip.parse().unwrap());
            let key = AddrKey {
                addr,
                family,
                _pad: [0; 3],
            };
            maps.addrs.get(&key).map(|v| v.flags)
        }
        // Every frontend here is a ClusterIP (internal scope): its unlisted ports are rejected.
        let fe = addr_flags::FRONTEND | addr_flags::CLUSTER_IP;
        let be = addr_flags::BACKEND;
        let mut r = Reconciler::adopt(FakeMaps::default()).unwrap();
        r.apply(&state(&[
            ("198.19.0.10", &["198.18.1.10"]),
            ("198.19.0.11", &["198.18.1.10", "198.18.1.11"]),
        ]));
        assert_eq!(flags(&r.maps, "198.19.0.10"), Some(fe));
        assert_eq!(flags(&r.maps, "198.19.0.11"), Some(fe));
        assert_eq!(flags(&r.maps, "198.18.1.10"), Some(be));
        assert_eq!(flags(&r.maps, "198.18.1.11"), Some(be));
        // The fake maps assert the order on every write: an address before its first entry,
        // removed after its last.
        r.apply(&state(&[("198.19.0.10", &["198.18.1.10"])]));
        assert_eq!(
            flags(&r.maps, "198.19.0.11"),
            None,
            "its last frontend went"
        );
        assert_eq!(
            flags(&r.maps, "198.18.1.11"),
            Some(be),
            "its only backend went: replies on their way still need the flag"
        );
        assert_eq!(flags(&r.maps, "198.18.1.10"), Some(be), "still a backend");
        r.retired_grace = Duration::ZERO;
        r.apply(&state(&[("198.19.0.10", &["198.18.1.10"])]));
        assert_eq!(flags(&r.maps, "198.18.1.11"), None, "its grace ended");
        // An agent adopting maps whose ADDRS_V1 an older agent did not keep: rebuilt at once,
        // before any pass (the programs test it first).
        let FakeMaps {
            services, backends, ..
        } = r.maps;
        let (addr, family) = map_addr("198.19.9.9".parse().unwrap());
        let stale = AddrKey {
            addr,
            family,
            _pad: [0; 3],
        };
        let again = Reconciler::adopt(FakeMaps {
            services,
            backends,
            // An older agent's entries had no CLUSTER_IP flag: adoption rebuilds them with it.
            addrs: [(stale, AddrValue { flags: fe })].into(),
            ..FakeMaps::default()
        })
        .unwrap();
        assert_eq!(flags(&again.maps, "198.19.9.9"), None);
        assert_eq!(flags(&again.maps, "198.19.0.10"), Some(fe));
        assert_eq!(flags(&again.maps, "198.18.1.10"), Some(be));
        assert_eq!(again.maps.addrs.len(), 2);
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

    // -----------------------------------------------------------------------------------------
    // Clearing the kernel's flow state of ended backends
    // -----------------------------------------------------------------------------------------

    const CLIENT: &str = "198.18.1.10";

    /// A frontend `vip:53/proto` with `ready` backends (port 5353) and `kept` ones (terminating,
    /// kept for established flows).
    fn fe(vip: &str, proto: Protocol, ready: &[&str], kept: &[&str]) -> (FrontendKey, Frontend) {
        let backend = |addr: &&str, terminating| MBackend {
            addr: addr.parse().unwrap(),
            port: 5353,
            local: false,
            terminating,
        };
        (
            FrontendKey {
                addr: vip.parse().unwrap(),
                port: 53,
                proto,
                scope: Scope::Internal,
            },
            Frontend {
                service: ServicePortRef {
                    namespace: "default".into(),
                    name: format!("{vip}-{proto}"),
                    port_name: String::new(),
                },
                affinity_timeout: None,
                local_only: false,
                backends: ready.iter().map(|b| backend(b, false)).collect(),
                kept_backends: kept.iter().map(|b| backend(b, true)).collect(),
                unready_backends: vec![],
                on_empty: EmptyAction::Reject,
            },
        )
    }

    fn desired(frontends: &[(FrontendKey, Frontend)]) -> DesiredState {
        DesiredState {
            frontends: frontends.iter().cloned().collect(),
            ..DesiredState::default()
        }
    }

    fn frontend_id(r: &Reconciler<FakeMaps>, vip: &str, proto: Protocol) -> u32 {
        let key = super::super::render::frontend_key(&FrontendKey {
            addr: vip.parse().unwrap(),
            port: 53,
            proto,
            scope: Scope::Internal,
        });
        r.current().services[&key].id
    }

    fn backend_id(r: &Reconciler<FakeMaps>, addr: &str) -> u32 {
        let (addr, _) = map_addr(addr.parse().unwrap());
        r.current()
            .backends
            .iter()
            .find_map(|(id, b)| (b.addr == addr).then_some(*id))
            .expect("backend programmed")
    }

    /// What the kernel writes for one translated flow from [`CLIENT`]:`sport` to `vip`:53 sent
    /// to `backend`:5353: the forward and the reply entry.
    fn flow(
        r: &mut Reconciler<FakeMaps>,
        proto: Protocol,
        vip: &str,
        backend: &str,
        sport: u16,
    ) -> [CtKey; 2] {
        let (frontend_id, backend_id) = (frontend_id(r, vip, proto), backend_id(r, backend));
        let (client, family) = map_addr(CLIENT.parse().unwrap());
        let (vip, _) = map_addr(vip.parse().unwrap());
        let (backend, _) = map_addr(backend.parse().unwrap());
        let proto = match proto {
            Protocol::Udp => ipproto::UDP,
            _ => ipproto::TCP,
        };
        let forward = CtKey {
            src: client,
            dst: vip,
            sport: Be16::from_host(sport),
            dport: Be16::from_host(53),
            proto,
            family,
            dir: dir::FORWARD,
            _pad: 0,
        };
        let reply = CtKey {
            src: backend,
            dst: client,
            sport: Be16::from_host(5353),
            dport: Be16::from_host(sport),
            dir: dir::REPLY,
            ..forward
        };
        let value = |addr, port| CtValue {
            addr,
            port: Be16::from_host(port),
            backend_id,
            frontend_id,
            ..CtValue::default()
        };
        r.maps.ct.insert(forward, value(backend, 5353));
        r.maps.ct.insert(reply, value(vip, 53));
        [forward, reply]
    }

    /// An affinity entry sending [`CLIENT`] of frontend `vip`/`proto` to `backend`.
    fn sticky(
        r: &mut Reconciler<FakeMaps>,
        vip: &str,
        proto: Protocol,
        backend: &str,
    ) -> AffinityKey {
        let key = AffinityKey {
            client: map_addr(CLIENT.parse().unwrap()).0,
            frontend_id: frontend_id(r, vip, proto),
            family: 4,
            _pad: [0; 3],
        };
        let value = AffinityValue {
            backend_id: backend_id(r, backend),
            ..AffinityValue::default()
        };
        r.maps.affinity.insert(key, value);
        key
    }

    /// The backend an unconnected UDP socket (`cookie`) was given for frontend `vip`/UDP.
    fn pinned(r: &mut Reconciler<FakeMaps>, cookie: u64, vip: &str, backend: &str) -> SockPinKey {
        let (vip_addr, family) = map_addr(vip.parse().unwrap());
        let key = SockPinKey {
            cookie,
            addr: vip_addr,
            port: Be16::from_host(53),
            family,
            _pad: [0; 5],
        };
        let value = SockPinValue {
            backend_id: backend_id(r, backend),
            frontend_id: frontend_id(r, vip, Protocol::Udp),
            addr: map_addr(backend.parse().unwrap()).0,
            port: Be16::from_host(5353),
            _pad: 0,
        };
        r.maps.sock_pins.insert(key, value);
        key
    }

    fn has_all(r: &Reconciler<FakeMaps>, keys: &[CtKey]) -> bool {
        keys.iter().all(|k| r.maps.ct.contains_key(k))
    }

    fn has_none(r: &Reconciler<FakeMaps>, keys: &[CtKey]) -> bool {
        keys.iter().all(|k| !r.maps.ct.contains_key(k))
    }

    const VIP: &str = "198.19.0.10";
    const A: &str = "198.18.2.10";
    const B: &str = "198.18.2.11";
    const C: &str = "198.18.2.12";

    #[test]
    fn a_removed_udp_backend_loses_its_flows_both_ways_and_its_affinity_entries() {
        let mut r = Reconciler::adopt(FakeMaps::default()).unwrap();
        let grace = Duration::from_millis(50);
        r.set_udp_reply_grace(grace);
        r.apply(&desired(&[
            fe(VIP, Protocol::Udp, &[A, B], &[]),
            fe(VIP, Protocol::Tcp, &[A, B], &[]),
        ]));
        let udp_a = [
            flow(&mut r, Protocol::Udp, VIP, A, 40000),
            flow(&mut r, Protocol::Udp, VIP, A, 40001),
        ]
        .concat();
        let udp_b = flow(&mut r, Protocol::Udp, VIP, B, 40002);
        let tcp_a = flow(&mut r, Protocol::Tcp, VIP, A, 40003);
        let sticky_a = sticky(&mut r, VIP, Protocol::Tcp, A);
        let sticky_b = sticky(&mut r, VIP, Protocol::Udp, B);
        let pinned_a = pinned(&mut r, 1, VIP, A);
        let pinned_b = pinned(&mut r, 2, VIP, B);

        let report = r.apply(&desired(&[
            fe(VIP, Protocol::Udp, &[B], &[]),
            fe(VIP, Protocol::Tcp, &[B], &[]),
        ]));
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(report.backends_deleted, 1);
        assert_eq!(
            report.cleared,
            Some(Cleared {
                removed_backends: 1,
                ended_pairs: 2,
                udp: Some(Sweep {
                    visited: 8,
                    deleted: 2,
                    flows: 2,
                    truncated: false
                }),
                affinity: Some(Sweep {
                    visited: 2,
                    deleted: 1,
                    flows: 1,
                    truncated: false
                }),
                sock_pins: Some(Sweep {
                    visited: 2,
                    deleted: 1,
                    flows: 1,
                    truncated: false
                }),
            })
        );
        assert!(
            !r.maps.sock_pins.contains_key(&pinned_a),
            "a socket's datagrams to the service choose again"
        );
        assert!(r.maps.sock_pins.contains_key(&pinned_b));
        assert_eq!(
            report.udp_replies, None,
            "the reply entries wait for the grace"
        );
        assert!(
            !r.maps.ct.contains_key(&udp_a[0]) && !r.maps.ct.contains_key(&udp_a[2]),
            "forward entries of UDP flows to A are gone: the next datagram chooses again"
        );
        assert!(
            r.maps.ct.contains_key(&udp_a[1]) && r.maps.ct.contains_key(&udp_a[3]),
            "their reply entries stay for replies already on their way"
        );
        assert!(has_all(&r, &udp_b), "flows to B stay");
        assert!(
            has_all(&r, &tcp_a),
            "TCP flows to A are left to end by themselves"
        );
        assert!(!r.maps.affinity.contains_key(&sticky_a));
        assert!(r.maps.affinity.contains_key(&sticky_b));
        assert_eq!(
            (r.maps.ct_passes, r.maps.affinity_passes),
            (1, 1),
            "one pass each"
        );
        // A pass before the grace is over leaves them; the first one after clears them, once.
        let same = desired(&[
            fe(VIP, Protocol::Udp, &[B], &[]),
            fe(VIP, Protocol::Tcp, &[B], &[]),
        ]);
        assert_eq!(r.apply(&same).udp_replies, None);
        std::thread::sleep(grace);
        let report = r.apply(&same);
        assert_eq!(report.udp_replies.map(|s| s.deleted), Some(2));
        assert!(
            has_none(&r, &udp_a),
            "forward and reply entries of flows to A are gone"
        );
        assert!(has_all(&r, &udp_b), "flows to B stay");
        assert_eq!(r.maps.ct_reply_passes, 1);
        assert_eq!(r.apply(&same).udp_replies, None, "cleared once");
        assert_eq!(r.maps.ct_reply_passes, 1);
    }

    #[test]
    fn a_restarted_agent_goes_on_after_the_highest_id_ever_issued() {
        const VIP2: &str = "198.19.0.11";
        const VIP3: &str = "198.19.0.12";
        let mut r = Reconciler::adopt(FakeMaps::default()).unwrap();
        r.apply(&desired(&[
            fe(VIP, Protocol::Udp, &[A, B], &[]),
            fe(VIP2, Protocol::Udp, &[A], &[]),
        ]));
        let (b_id, vip2_id) = (backend_id(&r, B), frontend_id(&r, VIP2, Protocol::Udp));
        // B and the second frontend go; their ids are free but entries may still name them.
        r.apply(&desired(&[fe(VIP, Protocol::Udp, &[A], &[])]));
        let FakeMaps {
            services,
            backends,
            counters,
            cursors,
            ..
        } = r.maps;
        let mut again = Reconciler::adopt(FakeMaps {
            services,
            backends,
            counters,
            cursors,
            ..FakeMaps::default()
        })
        .unwrap();
        let report = again.apply(&desired(&[
            fe(VIP, Protocol::Udp, &[A, C], &[]),
            fe(VIP3, Protocol::Udp, &[A], &[]),
        ]));
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert!(
            backend_id(&again, C) > b_id,
            "C got {}, B had {b_id}: an id reissued after a restart",
            backend_id(&again, C)
        );
        assert!(frontend_id(&again, VIP3, Protocol::Udp) > vip2_id);
        assert_eq!(
            again.maps.cursors,
            [
                frontend_id(&again, VIP3, Protocol::Udp) + 1,
                backend_id(&again, C) + 1
            ],
            "the cursors are kept as they move"
        );
    }

    #[test]
    fn a_terminating_backend_keeps_its_flows_until_it_is_removed() {
        let mut r = Reconciler::adopt(FakeMaps::default()).unwrap();
        // Reply entries go with their forward entries (the grace is tested below).
        r.set_udp_reply_grace(Duration::ZERO);
        r.apply(&desired(&[fe(VIP, Protocol::Udp, &[A, B], &[])]));
        let on_a = flow(&mut r, Protocol::Udp, VIP, A, 40000);
        let sticky_a = sticky(&mut r, VIP, Protocol::Udp, A);

        // A terminates: no new flows (no slot), established ones stay.
        let report = r.apply(&desired(&[fe(VIP, Protocol::Udp, &[B, C], &[A])]));
        assert_eq!(report.backends_deleted, 0);
        assert_eq!(report.cleared, None, "nothing ended: {report:?}");
        assert!(has_all(&r, &on_a));
        assert!(
            r.maps.affinity.contains_key(&sticky_a),
            "the kernel ignores it while A is terminating; it goes when A does"
        );
        assert_eq!(r.maps.ct_passes, 0);

        // A is gone.
        let report = r.apply(&desired(&[fe(VIP, Protocol::Udp, &[B, C], &[])]));
        let cleared = report.cleared.expect("A ended");
        assert_eq!((cleared.removed_backends, cleared.ended_pairs), (1, 1));
        assert_eq!(cleared.udp.map(|s| s.flows), Some(1));
        assert!(has_none(&r, &on_a));
        assert!(!r.maps.affinity.contains_key(&sticky_a));
    }

    #[test]
    fn a_backend_leaving_one_service_loses_only_that_services_udp_flows() {
        const VIP2: &str = "198.19.0.11";
        let mut r = Reconciler::adopt(FakeMaps::default()).unwrap();
        // Reply entries go with their forward entries (the grace is tested below).
        r.set_udp_reply_grace(Duration::ZERO);
        r.apply(&desired(&[
            fe(VIP, Protocol::Udp, &[A, B], &[]),
            fe(VIP2, Protocol::Udp, &[A], &[]),
        ]));
        let first = flow(&mut r, Protocol::Udp, VIP, A, 40000);
        let second = flow(&mut r, Protocol::Udp, VIP2, A, 40001);
        let sticky_first = sticky(&mut r, VIP, Protocol::Udp, A);
        let sticky_second = sticky(&mut r, VIP2, Protocol::Udp, A);

        let report = r.apply(&desired(&[
            fe(VIP, Protocol::Udp, &[B], &[]),
            fe(VIP2, Protocol::Udp, &[A], &[]),
        ]));
        assert_eq!(
            report.backends_deleted, 0,
            "A still serves the second service"
        );
        let cleared = report.cleared.expect("the pair (first service, A) ended");
        assert_eq!((cleared.removed_backends, cleared.ended_pairs), (0, 1));
        assert!(
            has_none(&r, &first),
            "the kernel would have kept this flow on A: A still exists"
        );
        assert!(has_all(&r, &second));
        assert!(!r.maps.affinity.contains_key(&sticky_first));
        assert!(r.maps.affinity.contains_key(&sticky_second));
    }

    #[test]
    fn a_deleted_udp_service_loses_its_flows_even_to_shared_backends() {
        const VIP2: &str = "198.19.0.11";
        let mut r = Reconciler::adopt(FakeMaps::default()).unwrap();
        // Reply entries go with their forward entries (the grace is tested below).
        r.set_udp_reply_grace(Duration::ZERO);
        r.apply(&desired(&[
            fe(VIP, Protocol::Udp, &[A], &[]),
            fe(VIP2, Protocol::Udp, &[A], &[]),
        ]));
        let gone = flow(&mut r, Protocol::Udp, VIP, A, 40000);
        let kept = flow(&mut r, Protocol::Udp, VIP2, A, 40001);
        let report = r.apply(&desired(&[fe(VIP2, Protocol::Udp, &[A], &[])]));
        assert_eq!(report.cleared.and_then(|c| c.udp).map(|s| s.flows), Some(1));
        assert!(has_none(&r, &gone) && has_all(&r, &kept));
    }

    #[test]
    fn tcp_only_changes_do_not_scan_the_connection_table() {
        let mut r = Reconciler::adopt(FakeMaps::default()).unwrap();
        r.apply(&desired(&[fe(VIP, Protocol::Tcp, &[A, B], &[])]));
        let tcp_a = flow(&mut r, Protocol::Tcp, VIP, A, 40000);
        let sticky_a = sticky(&mut r, VIP, Protocol::Tcp, A);
        let report = r.apply(&desired(&[fe(VIP, Protocol::Tcp, &[B], &[])]));
        let cleared = report.cleared.expect("A ended");
        assert_eq!(cleared.udp, None);
        assert_eq!(cleared.affinity.map(|s| s.deleted), Some(1));
        assert_eq!((r.maps.ct_passes, r.maps.affinity_passes), (0, 1));
        assert!(has_all(&r, &tcp_a));
        assert!(!r.maps.affinity.contains_key(&sticky_a));
    }

    #[test]
    fn a_restarted_agent_clears_flows_of_backends_it_only_adopted() {
        let mut r = Reconciler::adopt(FakeMaps::default()).unwrap();
        r.apply(&desired(&[fe(VIP, Protocol::Udp, &[B], &[A])]));
        let on_a = flow(&mut r, Protocol::Udp, VIP, A, 40000);
        let on_b = flow(&mut r, Protocol::Udp, VIP, B, 40001);
        let FakeMaps {
            services,
            backends,
            ct,
            counters,
            ..
        } = r.maps;
        // The new agent sees A in BACKENDS_V1 but in no slot: which frontend kept it is lost.
        let mut again = Reconciler::adopt(FakeMaps {
            services,
            backends,
            counters,
            ct,
            ..FakeMaps::default()
        })
        .unwrap();
        again.set_udp_reply_grace(Duration::ZERO);
        let report = again.apply(&desired(&[fe(VIP, Protocol::Udp, &[B], &[])]));
        let cleared = report.cleared.expect("A removed");
        assert_eq!((cleared.removed_backends, cleared.ended_pairs), (1, 0));
        assert_eq!(
            cleared.udp.map(|s| s.flows),
            Some(1),
            "scanned although no pair was known"
        );
        assert!(has_none(&again, &on_a) && has_all(&again, &on_b));
    }

    /// Everything the reconciler sent to the socket destroyer so far.
    fn sent(rx: &std::sync::mpsc::Receiver<EndedBackends>) -> Vec<EndedBackends> {
        rx.try_iter().collect()
    }

    fn sa(ip: &str, port: u16) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), port)
    }

    #[test]
    fn ended_udp_pairs_and_removed_backends_go_to_the_socket_destroyer_as_addresses() {
        const VIP2: &str = "198.19.0.11";
        let mut r = Reconciler::adopt(FakeMaps::default()).unwrap();
        let (sender, rx) = EndedSender::channel();
        r.send_ended_to(sender);
        r.apply(&desired(&[
            fe(VIP, Protocol::Udp, &[A, B], &[]),
            fe(VIP, Protocol::Tcp, &[A, B], &[]),
            fe(VIP2, Protocol::Udp, &[B], &[]),
        ]));
        assert!(sent(&rx).is_empty(), "nothing ended");

        // A is removed altogether; B leaves VIP2 (VIP keeps it).
        r.apply(&desired(&[
            fe(VIP, Protocol::Udp, &[B], &[]),
            fe(VIP, Protocol::Tcp, &[B], &[]),
            fe(VIP2, Protocol::Udp, &[C], &[]),
        ]));
        assert_eq!(
            sent(&rx),
            [EndedBackends {
                pairs: [(sa(VIP, 53), sa(A, 5353)), (sa(VIP2, 53), sa(B, 5353)),].into(),
                backends: [sa(A, 5353)].into(),
            }],
            "UDP pairs only (the TCP frontend's pair with A is not a socket to destroy)"
        );

        // A terminating backend has not ended: nothing is sent until it is removed.
        r.apply(&desired(&[
            fe(VIP, Protocol::Udp, &[C], &[B]),
            fe(VIP2, Protocol::Udp, &[C], &[]),
        ]));
        assert!(
            sent(&rx).iter().all(|e| !e.names(sa(VIP, 53), sa(B, 5353))),
            "B still drains on VIP"
        );
        r.apply(&desired(&[
            fe(VIP, Protocol::Udp, &[C], &[]),
            fe(VIP2, Protocol::Udp, &[C], &[]),
        ]));
        assert!(sent(&rx).iter().any(|e| e.names(sa(VIP, 53), sa(B, 5353))));
    }

    #[test]
    fn a_restarted_agent_sends_the_backends_it_removes_from_the_adopted_maps() {
        let mut r = Reconciler::adopt(FakeMaps::default()).unwrap();
        r.apply(&desired(&[fe(VIP, Protocol::Udp, &[A, B], &[])]));
        let FakeMaps {
            services,
            backends,
            counters,
            ..
        } = r.maps;
        // A left the slices while no agent ran: the next agent's first pass removes it.
        let mut again = Reconciler::adopt(FakeMaps {
            services,
            backends,
            counters,
            ..FakeMaps::default()
        })
        .unwrap();
        let (sender, rx) = EndedSender::channel();
        again.send_ended_to(sender);
        again.apply(&desired(&[fe(VIP, Protocol::Udp, &[B], &[])]));
        assert_eq!(
            sent(&rx),
            [EndedBackends {
                pairs: [(sa(VIP, 53), sa(A, 5353))].into(),
                backends: [sa(A, 5353)].into(),
            }]
        );
    }

    #[test]
    fn a_pass_stops_at_its_bound_and_says_so() {
        let maps = FakeMaps {
            sweep_limit: Some(3),
            ..FakeMaps::default()
        };
        let mut r = Reconciler::adopt(maps).unwrap();
        r.apply(&desired(&[fe(VIP, Protocol::Udp, &[A, B], &[])]));
        for sport in 0..4 {
            flow(&mut r, Protocol::Udp, VIP, A, 40000 + sport);
        }
        let report = r.apply(&desired(&[fe(VIP, Protocol::Udp, &[B], &[])]));
        let udp = report.cleared.and_then(|c| c.udp).expect("scanned");
        assert_eq!(udp.visited, 3);
        assert!(udp.truncated);
        assert_eq!(
            r.maps.ct.len(),
            8 - udp.deleted,
            "only what was read is deleted"
        );
        assert!(report.errors.is_empty(), "a cut-short pass is no error");
    }
}
