//! What the reconciler decided each frontend gets, kept between passes so a pass decides only
//! for the frontends that changed (pure: no maps, no kernel).
//!
//! Per frontend programmed ([`Target`]): its id, its slot list (backend id of slot 1..=count),
//! the backends it keeps for established flows. Per backend id: which frontends reference it
//! (its reference count, and what its `BACKENDS_V1` value is). And the entry totals the
//! capacity rule needs. The full pass rebuilds all of it from the maps
//! ([`Layout::rebuild`]); both passes decide through [`Layout::plan`], so they program the
//! same maps.
//!
//! Slots are stable ([`place_slots`]): a backend that stays keeps its slot, so one endpoint
//! added or removed rewrites one or two slots, not the frontend's whole list.
//!
//! Capacity: a programmed frontend keeps its place when a map is full. Removals are decided
//! first (they free room), then programmed frontends that changed, in key order, then new
//! ones in key order. A frontend fits when the entries it adds fit beside what the maps hold
//! at that point (new backends are written before those they replace are removed, so a
//! frontend swapping a backend needs one free `BACKENDS_V1` entry). One that does not fit is
//! left out whole and waits ([`Layout::skipped`]); a programmed one that would grow keeps
//! what it has, untouched. Those left out are decided again, in rounds, while a round lets one
//! in (what a later one freed may make room), so a pass ends where a second one would, and
//! waiting frontends are decided again at every pass. The writes follow the order of the
//! decisions ([`Change::wave`]), so what is freed is free before it is needed.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
};

use smallvec::SmallVec;
use svc_common::{
    Be16,
    service::{Backend, BackendName, ServiceKey, ServiceValue},
};

use super::{
    ids::IdMap,
    names::Fingerprint,
    render::{BackendRef, Capacity, Rendered, backend_value, frontend_key, map_addr, slot0_value},
};
use crate::model::{self, DesiredState, FrontendKey, Protocol};

/// The slot list of a frontend whose wanted backends (ids, in the model's sorted order) are
/// `wanted`, given its `previous` list (`None`: a frontend seen for the first time, which
/// gets the sorted order). A backend that stays keeps its slot; new backends fill the holes
/// left by removed ones (lowest hole first, in sorted order), then are appended; when more
/// were removed than added, backends from the highest slots move into the lowest holes. The
/// result holds each wanted id once (slot `i + 1` is element `i`).
#[must_use]
pub fn place_slots(previous: Option<&[u32]>, wanted: &[u32]) -> Vec<u32> {
    let Some(previous) = previous else {
        return wanted.to_vec();
    };
    let want: HashSet<u32> = wanted.iter().copied().collect();
    let mut slots: Vec<Option<u32>> = previous
        .iter()
        .map(|id| want.contains(id).then_some(*id))
        .collect();
    let stayed: HashSet<u32> = slots.iter().flatten().copied().collect();
    let mut new = wanted.iter().filter(|id| !stayed.contains(id)).copied();
    for slot in slots.iter_mut().filter(|s| s.is_none()) {
        match new.next() {
            Some(id) => *slot = Some(id),
            None => break,
        }
    }
    slots.extend(new.map(Some));
    let mut hole = 0;
    loop {
        while slots.last() == Some(&None) {
            slots.pop();
        }
        while slots.get(hole).is_some_and(Option::is_some) {
            hole += 1;
        }
        if hole >= slots.len() {
            break;
        }
        // The last slot (occupied) moves into the lowest hole.
        slots.swap_remove(hole);
    }
    slots.into_iter().flatten().collect()
}

/// What one frontend is programmed with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Its slot 0 entry (its id, count, flags).
    pub value: ServiceValue,
    /// The backend id of each slot, slot 1 first.
    pub slots: Vec<u32>,
    /// Backends kept for established flows (reachable: their flows stay).
    pub kept: Vec<u32>,
    /// Backends kept for established TCP flows only (not reachable).
    pub unready: Vec<u32>,
}

impl Target {
    /// `SERVICES_V1` entries it takes.
    fn entries(&self) -> u64 {
        1 + self.slots.len() as u64
    }

    /// Every backend id it references (in a slot or kept).
    pub fn backend_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.slots
            .iter()
            .chain(&self.kept)
            .chain(&self.unready)
            .copied()
    }

    /// `(frontend id, backend id)` of every backend its flows may be on.
    pub fn reachable(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        let id = self.value.id;
        self.slots.iter().chain(&self.kept).map(move |b| (id, *b))
    }
}

/// One frontend decided by [`Layout::plan`]: what it had and what it gets.
#[derive(Debug, Clone)]
pub struct Change {
    /// The frontend.
    pub key: FrontendKey,
    /// What it was programmed with (`None`: new).
    pub before: Option<Target>,
    /// What it is programmed with now (`None`: removed).
    pub after: Option<Target>,
    /// When its writes run, in increasing order: 0 removals and changes that need no new
    /// entry; then each programmed frontend that needs new entries, one wave each (what it
    /// frees is free before the next one writes); last (`usize::MAX`) new frontends. Each
    /// wave removes what it frees before the next one writes.
    pub wave: usize,
}

/// The decisions kept between passes (see the module documentation).
#[derive(Debug, Default)]
pub struct Layout {
    /// Frontend ids.
    pub frontend_ids: IdMap<FrontendKey>,
    /// Backend ids.
    pub backend_ids: IdMap<BackendRef>,
    targets: BTreeMap<FrontendKey, Target>,
    /// Per backend id: the frontends that reference it, each with whether in a slot and the
    /// flags it asks for. (The ids at an address are a range of `backend_ids`.)
    refs: HashMap<u32, Refs>,
    /// `SERVICES_V1` entries the targets take.
    entries: u64,
    /// Frontends left out because a map is full, with why; decided again at every pass.
    waiting: BTreeMap<FrontendKey, String>,
    /// Frontends this datapath cannot program, with why.
    unsupported: BTreeMap<FrontendKey, String>,
    /// Frontends the next [`plan`](Self::plan) must not program, with why (restricted ones
    /// whose `SOURCE_RANGES_V1` entries are not in place: see [`hold_back`](Self::hold_back)).
    held_back: BTreeMap<FrontendKey, String>,
    /// Backend ids no frontend references any more whose entries stay until the end of the
    /// wave being decided (see [`plan`](Self::plan)).
    limbo: HashSet<u32>,
}

/// Who references one backend id: each frontend (in key order), whether it has the backend in
/// a slot, and the `BACKENDS_V1` flags it asks for (the address, port and family are the id's
/// own, from `backend_ids`). A sorted list, not a `BTreeMap` (whose first node takes about
/// 700 bytes); almost every backend has one referrer, held inline: at 90,000 backends a vector
/// each (four entries' room and a whole `Backend` per entry) was 15 MiB.
#[derive(Clone, Debug, Default)]
struct Refs(SmallVec<[(FrontendKey, bool, u8); 1]>);

impl Refs {
    fn get(&self, key: &FrontendKey) -> Option<(bool, u8)> {
        self.0
            .binary_search_by(|(k, _, _)| k.cmp(key))
            .ok()
            .map(|i| (self.0[i].1, self.0[i].2))
    }

    fn insert(&mut self, key: FrontendKey, slot: bool, flags: u8) {
        match self.0.binary_search_by(|(k, _, _)| k.cmp(&key)) {
            Ok(i) => self.0[i] = (key, slot, flags),
            Err(i) => self.0.insert(i, (key, slot, flags)),
        }
    }

    fn remove(&mut self, key: &FrontendKey) {
        if let Ok(i) = self.0.binary_search_by(|(k, _, _)| k.cmp(key)) {
            self.0.remove(i);
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `(in a slot, flags)` of each referrer, in key order.
    fn values(&self) -> impl DoubleEndedIterator<Item = (bool, u8)> + '_ {
        self.0.iter().map(|(_, slot, flags)| (*slot, *flags))
    }
}

/// Why `fe` cannot be programmed at all, if it cannot.
fn unsupported(key: &FrontendKey, fe: &model::Frontend) -> Option<String> {
    if key.proto == Protocol::Sctp {
        return Some("SCTP is not translated by this datapath yet".to_owned());
    }
    if fe.backends.len() > usize::from(u16::MAX) {
        return Some(format!(
            "{} endpoints; at most {} per port",
            fe.backends.len(),
            u16::MAX
        ));
    }
    None
}

/// Every backend of `fe` (ready, kept, unready).
fn all_backends(fe: &model::Frontend) -> impl Iterator<Item = &model::Backend> {
    fe.backends
        .iter()
        .chain(&fe.kept_backends)
        .chain(&fe.unready_backends)
}

impl Layout {
    /// What `key` is programmed with.
    #[must_use]
    pub fn target(&self, key: &FrontendKey) -> Option<&Target> {
        self.targets.get(key)
    }

    /// Every programmed frontend.
    pub fn targets(&self) -> impl Iterator<Item = (&FrontendKey, &Target)> {
        self.targets.iter()
    }

    /// Whether a frontend references backend `id`.
    #[must_use]
    pub fn referenced(&self, id: u32) -> bool {
        self.refs.contains_key(&id)
    }

    /// Every backend id a frontend references.
    pub fn backend_ids_referenced(&self) -> impl Iterator<Item = u32> + '_ {
        self.refs.keys().copied()
    }

    /// The `BACKENDS_V1` value of backend `id`: what the last frontend (in key order) that has
    /// it in a slot asks for, else what the first that keeps it asks for; `None` when no
    /// frontend references it.
    #[must_use]
    pub fn backend(&self, id: u32) -> Option<Backend> {
        let by = self.refs.get(&id)?;
        let (_, flags) = by
            .values()
            .rev()
            .find(|(slot, _)| *slot)
            .or_else(|| by.values().next())?;
        let (addr, port) = *self.backend_ids.key_of(id)?;
        let (addr, family) = map_addr(addr);
        Some(Backend {
            addr,
            port: Be16::from_host(port),
            family,
            flags,
        })
    }

    /// The address of backend `id`, while it has an id.
    #[must_use]
    pub fn backend_addr(&self, id: u32) -> Option<IpAddr> {
        self.backend_ids.key_of(id).map(|r| r.0)
    }

    /// The referenced backend ids at `addr` (every backend id is referenced between passes:
    /// an id no frontend references is freed by the pass that leaves it).
    pub fn backends_at(&self, addr: &IpAddr) -> impl Iterator<Item = u32> + '_ {
        self.backend_ids
            .range((*addr, 0)..=(*addr, u16::MAX))
            .map(|(_, id)| id)
            .filter(|id| self.refs.contains_key(id))
    }

    /// Frontends left out (map full, or not programmable), with why, in key order.
    #[must_use]
    pub fn skipped(&self) -> Vec<(FrontendKey, String)> {
        let mut all: BTreeMap<FrontendKey, String> = self.unsupported.clone();
        all.extend(self.waiting.iter().map(|(k, v)| (*k, v.clone())));
        all.into_iter().collect()
    }

    /// Whether a frontend waits for room.
    #[must_use]
    pub fn is_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Frontends programmed, waiting for room, and not programmable (no map walk).
    #[must_use]
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.targets.len(),
            self.waiting.len(),
            self.unsupported.len(),
        )
    }

    /// (`SERVICES_V1`, `BACKENDS_V1`) entries the targets take.
    #[must_use]
    pub fn totals(&self) -> (u64, usize) {
        (self.entries, self.refs.len())
    }

    /// What the targets mean in `SERVICES_V1` and `BACKENDS_V1` (names from `desired`).
    #[must_use]
    pub fn rendered(&self, desired: &DesiredState) -> Rendered {
        let mut out = Rendered::default();
        for (key, t) in &self.targets {
            let slot0 = frontend_key(key);
            out.services.insert(slot0, t.value);
            for (slot, id) in (1..).zip(&t.slots) {
                out.services.insert(
                    ServiceKey { slot, ..slot0 },
                    ServiceValue {
                        id: *id,
                        ..ServiceValue::default()
                    },
                );
            }
            out.reachable.extend(t.reachable());
            if let Some(fe) = desired.frontends.get(key) {
                let s = &fe.service;
                out.frontend_names.insert(
                    t.value.id,
                    Fingerprint::of(&super::names::frontend_name(
                        &s.namespace,
                        &s.name,
                        &s.port_name,
                    )),
                );
            }
        }
        for id in self.refs.keys() {
            if let Some(b) = self.backend(*id) {
                out.backends.insert(*id, b);
            }
            let name = self
                .backend_addr(*id)
                .and_then(|a| desired.backend_names.get(&a));
            if let Some(name) = name {
                out.names
                    .insert(*id, Fingerprint::of(&BackendName::new(name)));
            }
        }
        out.skipped = self.skipped();
        out
    }

    /// Forgets every target and rebuilds them from what the maps hold (`services`,
    /// `backends`): ids from the entries, slot lists from slots 1..=count (up to the first
    /// missing one), kept backends from the previous targets of the same id (the maps do not
    /// say who keeps a backend) when they are still in `backends`. Id cursors are kept
    /// (`cursors`: where to go on from; 0 keeps the one after the highest id adopted).
    pub fn rebuild(
        &mut self,
        services: &BTreeMap<ServiceKey, ServiceValue>,
        backends: &BTreeMap<u32, Backend>,
        cursors: [u32; 2],
        frontend_of: impl Fn(&ServiceKey) -> Option<FrontendKey>,
        backend_ref: impl Fn(&Backend) -> BackendRef,
    ) {
        let old = std::mem::take(&mut self.targets);
        // What each frontend asked of its backends (the maps hold only the value that won).
        let asked = std::mem::take(&mut self.refs);
        self.frontend_ids = IdMap::default();
        self.backend_ids = IdMap::default();
        self.entries = 0;
        for (id, b) in backends {
            self.backend_ids.adopt(backend_ref(b), *id);
        }
        for (k, v) in services.iter().filter(|(k, _)| k.slot == 0) {
            let Some(key) = frontend_of(k) else {
                continue;
            };
            let slots: Vec<u32> = (1..=v.count)
                .map_while(|slot| services.get(&ServiceKey { slot, ..*k }).map(|s| s.id))
                .take_while(|id| backends.contains_key(id))
                .collect();
            let known = |ids: &[u32]| -> Vec<u32> {
                ids.iter()
                    .filter(|id| backends.contains_key(id) && !slots.contains(id))
                    .copied()
                    .collect()
            };
            let (kept, unready) = old
                .get(&key)
                .filter(|t| t.value.id == v.id)
                .map(|t| (known(&t.kept), known(&t.unready)))
                .unwrap_or_default();
            self.frontend_ids.adopt(key, v.id);
            let target = Target {
                value: *v,
                slots,
                kept,
                unready,
            };
            let uses: Vec<(u32, bool)> = target
                .slots
                .iter()
                .map(|id| (*id, true))
                .chain(
                    target
                        .kept
                        .iter()
                        .chain(&target.unready)
                        .map(|id| (*id, false)),
                )
                .collect();
            for (id, slot) in uses {
                let flags = asked
                    .get(&id)
                    .and_then(|by| by.get(&key))
                    .filter(|(was_slot, _)| *was_slot == slot)
                    .map_or(backends[&id].flags, |(_, flags)| flags);
                self.add_ref(id, key, slot, flags);
            }
            self.entries += target.entries();
            self.targets.insert(key, target);
        }
        self.frontend_ids.resume_at(cursors[0]);
        self.backend_ids.resume_at(cursors[1]);
    }

    /// Frees the ids of backends no frontend references (kept by [`rebuild`](Self::rebuild)
    /// until the next [`plan`](Self::plan) says whether a frontend keeps them).
    pub fn forget_unreferenced(&mut self) {
        let unused: Vec<BackendRef> = self
            .backend_ids
            .keys()
            .filter(|r| {
                self.backend_ids
                    .get(r)
                    .is_some_and(|id| !self.refs.contains_key(&id))
            })
            .copied()
            .collect();
        for r in unused {
            self.backend_ids.remove(&r);
        }
    }

    /// Makes the next [`plan`](Self::plan) leave out the frontends of `held` (when it decides
    /// them), as it leaves out those it cannot program: a programmed one is removed. For a
    /// restricted load balancer IP whose `SOURCE_RANGES_V1` entries could not be written: not
    /// served from outside rather than served to every client.
    pub fn hold_back(&mut self, held: BTreeMap<FrontendKey, String>) {
        self.held_back = held;
    }

    /// The frontends of `candidates` (and each waiting one), sorted out for
    /// [`plan`](Self::plan): those to remove (programmed, no longer wanted or not
    /// programmable), those programmed and still wanted, and new ones; each group in key order.
    /// Records (anew) which are not programmable, and why.
    #[expect(
        clippy::type_complexity,
        reason = "three lists of one kind, named where they are taken apart"
    )]
    fn sort_out<'d>(
        &mut self,
        desired: &'d DesiredState,
        candidates: impl IntoIterator<Item = FrontendKey>,
    ) -> (
        Vec<FrontendKey>,
        Vec<(FrontendKey, &'d model::Frontend)>,
        Vec<(FrontendKey, &'d model::Frontend)>,
    ) {
        let mut keys: BTreeSet<FrontendKey> = candidates.into_iter().collect();
        keys.extend(self.waiting.keys().copied());
        let (mut removed, mut programmed, mut new) = (Vec::new(), Vec::new(), Vec::new());
        for key in keys {
            self.waiting.remove(&key);
            self.unsupported.remove(&key);
            let mut fe = desired.frontends.get(&key).map(|fe| &**fe);
            let held_back = &mut self.held_back;
            if let Some(why) = fe.and_then(|fe| unsupported(&key, fe).or(held_back.remove(&key))) {
                self.unsupported.insert(key, why);
                fe = None;
            }
            match (fe, self.targets.contains_key(&key)) {
                (None, true) => removed.push(key),
                (None, false) => {}
                (Some(fe), true) => programmed.push((key, fe)),
                (Some(fe), false) => new.push((key, fe)),
            }
        }
        self.held_back.clear(); // Only for this plan.
        (removed, programmed, new)
    }

    /// Decides what each frontend of `candidates` (and each waiting one) gets, from its entry
    /// in `desired` (missing: removed), and updates the targets; see the module documentation
    /// for the order and the capacity rule. Returns one [`Change`] per frontend that is
    /// removed, changed (possibly to the same target: its entries are compared with the maps)
    /// or new; a frontend left out has none.
    pub fn plan(
        &mut self,
        desired: &DesiredState,
        candidates: impl IntoIterator<Item = FrontendKey>,
        cap: Capacity,
    ) -> Vec<Change> {
        let (removed, programmed, mut new) = self.sort_out(desired, candidates);
        let mut changes = Vec::new();
        // Backends a decision left unused stay in `BACKENDS_V1` until the end of the wave that
        // frees them ("limbo"): a frontend of the same wave may take them again as they are;
        // one of a later wave gets a new id (the old entry is gone by then).
        let mut limbo: Vec<u32> = Vec::new();
        for key in removed {
            let (before, freed) = self.unset(&key);
            limbo.extend(freed);
            self.frontend_ids.remove(&key);
            changes.push(Change {
                key,
                before,
                after: None,
                wave: 0,
            });
        }
        // Programmed frontends that need no new entry first (what they free is free for the
        // others), then those that do, then new ones; each group in key order.
        let mut deferred = Vec::new();
        for (key, fe) in programmed {
            if self.room(self.targets.get(&key), fe, cap) != Ok(false) {
                deferred.push((key, fe));
                continue;
            }
            let (before, freed) = self.unset(&key);
            limbo.extend(freed);
            let after = self.set(key, fe, before.as_ref().map(|t| t.slots.as_slice()));
            changes.push(Change {
                key,
                before,
                after: Some(after),
                wave: 0,
            });
        }
        // Wave 0 ends: what it freed is gone.
        self.release(limbo);
        // Then rounds, until one lets nothing in: a frontend left out may fit after what a
        // later one (in key order) freed, so the result does not depend on where it started.
        let mut growing = 0;
        let mut decided = changes.len();
        loop {
            let mut left_out = (Vec::new(), Vec::new());
            for (key, fe) in std::mem::take(&mut deferred) {
                match self.room(self.targets.get(&key), fe, cap) {
                    Ok(_) => {
                        let (before, freed) = self.unset(&key);
                        let after = self.set(key, fe, before.as_ref().map(|t| t.slots.as_slice()));
                        // Its own wave, in the order decided: a later one counted on what it
                        // freed.
                        growing += 1;
                        changes.push(Change {
                            key,
                            before,
                            after: Some(after),
                            wave: growing,
                        });
                        self.release(freed);
                    }
                    Err(why) => {
                        self.waiting.insert(key, why);
                        left_out.0.push((key, fe));
                    }
                }
            }
            for (key, fe) in std::mem::take(&mut new) {
                match self.room(None, fe, cap) {
                    Ok(_) => {
                        let after = self.set(key, fe, None);
                        changes.push(Change {
                            key,
                            before: None,
                            after: Some(after),
                            wave: usize::MAX,
                        });
                    }
                    Err(why) => {
                        self.waiting.insert(key, why);
                        left_out.1.push((key, fe));
                    }
                }
            }
            let waited = left_out.0.len() + left_out.1.len();
            (deferred, new) = left_out;
            if waited == 0 || changes.len() == decided {
                break;
            }
            decided = changes.len();
            for (key, _) in deferred.iter().chain(&new) {
                self.waiting.remove(key);
            }
        }
        changes
    }

    /// Whether `fe` fits as the new value of a frontend programmed as `before`: `Ok(grows)`
    /// (whether it needs new entries), or why not. A change that takes no new entry of a map
    /// always fits it.
    fn room(
        &self,
        before: Option<&Target>,
        fe: &model::Frontend,
        cap: Capacity,
    ) -> Result<bool, String> {
        let wanted: BTreeSet<BackendRef> = all_backends(fe).map(|b| (b.addr, b.port)).collect();
        let added = wanted
            .iter()
            .filter(|r| {
                self.backend_ids
                    .get(r)
                    .is_none_or(|id| !self.refs.contains_key(&id) && !self.limbo.contains(&id))
            })
            .count();
        // Limbo holds only ids no frontend references (taking one again takes it out).
        let (svc_before, be_before) = (self.entries, self.refs.len() + self.limbo.len());
        let svc_after =
            svc_before - before.map_or(0, Target::entries) + 1 + fe.backends.len() as u64;
        // New backends are written before the ones they replace are removed: at the peak the
        // map holds both.
        let be_peak = be_before + added;
        if svc_after > svc_before && svc_after > u64::from(cap.services) {
            return Err(format!(
                "map SERVICES_V1 is full ({} entries)",
                cap.services
            ));
        }
        if added > 0 && be_peak > cap.backends as usize {
            return Err(format!(
                "map BACKENDS_V1 is full ({} entries)",
                cap.backends
            ));
        }
        Ok(svc_after > svc_before || added > 0)
    }

    /// Programs `key` as `fe` (ids allocated as needed, slots placed after `previous`).
    fn set(&mut self, key: FrontendKey, fe: &model::Frontend, previous: Option<&[u32]>) -> Target {
        let id = self.frontend_ids.get_or_alloc(&key);
        let mut ids = |list: &[model::Backend]| -> Vec<u32> {
            list.iter()
                .map(|b| self.backend_ids.get_or_alloc(&(b.addr, b.port)))
                .collect()
        };
        let wanted = ids(&fe.backends);
        let kept = ids(&fe.kept_backends);
        let unready = ids(&fe.unready_backends);
        for (b, id) in fe.backends.iter().zip(&wanted) {
            self.add_ref(*id, key, true, backend_value(b).flags);
        }
        let others = fe.kept_backends.iter().chain(&fe.unready_backends);
        for (b, id) in others.zip(kept.iter().chain(&unready)) {
            self.add_ref(*id, key, false, backend_value(b).flags);
        }
        let target = Target {
            value: slot0_value(fe, id),
            slots: place_slots(previous, &wanted),
            kept,
            unready,
        };
        self.entries += target.entries();
        self.targets.insert(key, target.clone());
        target
    }

    /// Forgets the target of `key`: returns it and the backend ids no frontend references any
    /// more (their ids are freed by [`release`](Self::release), after the new target took the
    /// ones it keeps).
    fn unset(&mut self, key: &FrontendKey) -> (Option<Target>, Vec<u32>) {
        let Some(target) = self.targets.remove(key) else {
            return (None, Vec::new());
        };
        self.entries -= target.entries();
        let mut orphans = Vec::new();
        for id in target.backend_ids() {
            let Some(by) = self.refs.get_mut(&id) else {
                continue;
            };
            by.remove(key);
            if by.is_empty() {
                self.refs.remove(&id);
                self.limbo.insert(id);
                orphans.push(id);
            }
        }
        (Some(target), orphans)
    }

    /// Frees the ids of `orphans` that no frontend took again.
    fn release(&mut self, orphans: Vec<u32>) {
        for id in &orphans {
            self.limbo.remove(id);
        }
        for id in orphans {
            if self.refs.contains_key(&id) {
                continue;
            }
            let Some(r) = self.backend_ids.key_of(id).copied() else {
                continue;
            };
            self.backend_ids.remove(&r);
        }
    }

    fn add_ref(&mut self, id: u32, key: FrontendKey, slot: bool, flags: u8) {
        self.limbo.remove(&id);
        self.refs.entry(id).or_default().insert(key, slot, flags);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs_keep_key_order_and_one_value_per_frontend() {
        let key = |port| FrontendKey {
            addr: "198.19.0.10".parse().unwrap(),
            port,
            proto: Protocol::Tcp,
            scope: model::Scope::Internal,
        };
        let mut refs = Refs::default();
        refs.insert(key(81), true, 1);
        // One referrer: held inline.
        assert!(!refs.0.spilled());
        refs.insert(key(80), false, 2);
        refs.insert(key(82), true, 3);
        // Asked again: replaced, not added.
        refs.insert(key(81), false, 4);
        let in_order: Vec<u8> = refs.values().map(|(_, flags)| flags).collect();
        assert_eq!(in_order, [2, 4, 3]);
        assert_eq!(refs.get(&key(81)), Some((false, 4)));
        refs.remove(&key(80));
        refs.remove(&key(79));
        assert_eq!(refs.get(&key(80)), None);
        assert_eq!(refs.values().count(), 2);
        refs.remove(&key(81));
        refs.remove(&key(82));
        assert!(refs.is_empty());
    }

    #[test]
    fn a_new_frontend_gets_the_sorted_order() {
        assert_eq!(place_slots(None, &[3, 1, 2]), [3, 1, 2]);
        assert_eq!(place_slots(Some(&[]), &[3, 1, 2]), [3, 1, 2]);
    }

    #[test]
    fn backends_that_stay_keep_their_slot() {
        // One removed, one added: the new one takes the hole.
        assert_eq!(place_slots(Some(&[1, 2, 3]), &[1, 3, 4]), [1, 4, 3]);
        // Only added: appended in sorted order.
        assert_eq!(place_slots(Some(&[5, 2]), &[2, 5, 7, 9]), [5, 2, 7, 9]);
        // Holes filled lowest first, in the wanted order, the rest appended.
        assert_eq!(
            place_slots(Some(&[1, 2, 3, 4]), &[2, 4, 7, 8, 9]),
            [7, 2, 8, 4, 9]
        );
        // Unchanged.
        assert_eq!(place_slots(Some(&[4, 1, 3]), &[1, 3, 4]), [4, 1, 3]);
    }

    #[test]
    fn removals_move_the_highest_slots_into_the_lowest_holes() {
        // Slot 1 left: slot 4's backend moves there, slots 2 and 3 stay.
        assert_eq!(place_slots(Some(&[1, 2, 3, 4]), &[2, 3, 4]), [4, 2, 3]);
        // The last slot left: nothing moves.
        assert_eq!(place_slots(Some(&[1, 2, 3, 4]), &[1, 2, 3]), [1, 2, 3]);
        // Slots 1 and 3 left, one new: the new one fills slot 1, slot 4's moves to slot 3.
        assert_eq!(
            place_slots(Some(&[1, 2, 3, 4, 5]), &[2, 4, 5, 9]),
            [9, 2, 5, 4]
        );
        // Everything left.
        assert_eq!(place_slots(Some(&[1, 2]), &[]), Vec::<u32>::new());
        // Slots 1, 2 left of 5: 5 into 1, 4 into 2.
        assert_eq!(place_slots(Some(&[1, 2, 3, 4, 5]), &[3, 4, 5]), [5, 4, 3]);
    }

    #[test]
    fn one_endpoint_added_or_removed_moves_at_most_one_other_slot() {
        let before: Vec<u32> = (1..=100).collect();
        for gone in [1, 50, 100] {
            let wanted: Vec<u32> = before.iter().copied().filter(|id| *id != gone).collect();
            let after = place_slots(Some(&before), &wanted);
            let moved = after.iter().zip(&before).filter(|(a, b)| a != b).count();
            assert!(moved <= 1, "{gone}: {moved} slots rewritten");
            let mut sorted = after.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, wanted);
        }
        let mut wanted = before.clone();
        wanted.insert(0, 1000);
        let after = place_slots(Some(&before), &wanted);
        assert_eq!(after[..100], before[..]);
        assert_eq!(after[100], 1000);
    }
}
