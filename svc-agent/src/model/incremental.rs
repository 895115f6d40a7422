//! The incremental model: the Service, not the world, is the unit of work.
//!
//! [`Model`] keeps the current objects (as the `Arc`s the source hands out) and the
//! [`DesiredState`] computed from them, and updates that state in place when objects change.
//! The oracle is [`compute`](super::compute): after every [`Model::update`] and
//! [`Model::replace`], [`Model::state`] equals `compute` of a snapshot of the current objects,
//! and the returned [`Delta`] equals [`Delta::between`] the state before and after.
//!
//! How a change is turned into work:
//! - **Dirty set.** Setting a Service marks its group (the Service `namespace/name` with the
//!   slices labelled for it) dirty. Setting a slice marks the group of its new owner and of
//!   every owner it had (the model remembers each slice key's owners, so a relabel or a delete
//!   dirties the old owner too). [`Model::update`] recomputes only the dirty groups, with
//!   `compute_group` (the single source of truth for one Service, shared with `compute`),
//!   and skips a group whose inputs are the same objects as last time (`Arc::ptr_eq`) or equal
//!   in content.
//! - **Ownership index.** For each [`FrontendKey`], its claimants in the order `compute`'s
//!   merge visits them: by Service namespace/name, then claim order within the Service.
//!   When a group's claims change, only the keys it claimed before or claims now are
//!   re-resolved.
//! - **The conflict rule.** The first claimant of a key owns it: its frontend is the one in
//!   [`DesiredState::frontends`]. Every later claimant (another Service, or a later port of
//!   the same Service) gets the conflict error `compute` reports, naming the owner. These
//!   errors are kept per key, so they come and go with the claimants.
//! - **Backend names.** Per address, a multiset of the `targetRef` names the groups list for
//!   it; the state holds the smallest. A group's change touches only its addresses.
//! - **Errors.** Kept in parts: per group, per conflicted key, duplicate objects, nameless
//!   Services and the Node. The sorted, deduplicated [`DesiredState::errors`] is rebuilt from
//!   the parts only when one of them changed (errors are few).
//! - **Topology.** Every group's output depends on this node's zone (the
//!   `topology.kubernetes.io/zone` label of its Node, see [`node_zone`]): when an update
//!   finds the zone changed, every group is recomputed (a rare event: a Node's zone is set
//!   when it joins). [`DesiredState::topology_notes`] is rebuilt from the groups' notes, like
//!   the errors, only when a group's notes changed.
//!
//! Nothing walks the whole state on an update: the cost follows the dirty set, plus map
//! operations. [`Model::replace`] (a relist, the standalone source, the periodic audit) walks
//! the new object set once to find what differs, then updates like any other change.
//!
//! Objects are identified by the namespace and name the caller gives, which must be the
//! object's own (`metadata.namespace`, or `default` when it has none, and `metadata.name`):
//! that is how `compute` tells copies of one object apart. A nameless object (empty name)
//! only comes from the file source; like `compute`, the model keeps every copy of it.

use std::{
    borrow::Borrow,
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    hash::{Hash, Hasher},
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::api::core::v1::Node;

use smallvec::SmallVec;

use super::{
    Delta, DesiredState, FrontendKey, GroupOutput, NodePortAddresses, ObjectError, Place, Slice,
    Snapshot, Svc, TopologyNote, compute_group, conflict_error, kept_copies, merge_health_check,
    namespace_of, node_addresses, node_zone, nodeport_addresses, slice_owner, sorted_by_name,
};

/// A namespace and a name: an object's identity, or the Service a group is for.
///
/// Hashed as its borrowed form, [`NameKey`], so maps keyed by it are searched with two
/// `&str`s, without allocating. One allocation holds both parts (a Service's name is a key of
/// five maps of the model). Compared and ordered as (namespace, name).
#[derive(Clone)]
struct Name {
    /// The namespace, then the name.
    text: Box<str>,
    /// Where the name starts in `text`.
    split: usize,
}

impl Name {
    fn namespace(&self) -> &str {
        &self.text[..self.split]
    }

    fn name(&self) -> &str {
        &self.text[self.split..]
    }
}

impl PartialEq for Name {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for Name {}

impl PartialOrd for Name {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Name {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.parts().cmp(&other.parts())
    }
}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace(), self.name())
    }
}

/// A namespace and a name, owned ([`Name`]) or borrowed (`(&str, &str)`).
trait NameKey {
    fn parts(&self) -> (&str, &str);
}

impl NameKey for Name {
    fn parts(&self) -> (&str, &str) {
        (self.namespace(), self.name())
    }
}

impl NameKey for (&str, &str) {
    fn parts(&self) -> (&str, &str) {
        *self
    }
}

impl<'a> Borrow<dyn NameKey + 'a> for Name {
    fn borrow(&self) -> &(dyn NameKey + 'a) {
        self
    }
}

impl Hash for dyn NameKey + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.parts().hash(state);
    }
}

impl PartialEq for dyn NameKey + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn NameKey + '_ {}

impl Hash for Name {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // The same as the borrowed form's, as `Borrow` requires.
        self.parts().hash(state);
    }
}

impl Name {
    fn new(namespace: &str, name: &str) -> Self {
        let mut text = String::with_capacity(namespace.len() + name.len());
        text.push_str(namespace);
        text.push_str(name);
        Self {
            text: text.into_boxed_str(),
            split: namespace.len(),
        }
    }

    /// The identity `compute` gives an object: its namespace (`default` when none) and name
    /// (empty when none).
    fn of(meta: &super::SvcMeta) -> Self {
        Self::new(
            namespace_of(meta.namespace.as_deref()),
            meta.name.as_deref().unwrap_or_default(),
        )
    }

    /// [`of`](Self::of) for a slice.
    fn of_slice(slice: &Slice) -> Self {
        Self::new(
            namespace_of(slice.namespace.as_deref()),
            slice.name.as_deref().unwrap_or_default(),
        )
    }
}

/// The Service group a slice belongs to (see `slice_owner`).
fn owner_of(slice: &Slice) -> Option<Name> {
    slice_owner(slice).map(|(namespace, name)| Name::new(namespace, name))
}

/// Whether `slice` belongs to the group `group` (without allocating).
fn owned_by(slice: &Slice, group: &Name) -> bool {
    slice_owner(slice) == Some(group.parts())
}

/// The copies of one object name that `compute` uses (see `kept_copies`): none when they
/// differ.
fn kept<'a, T: PartialEq>(kind: &'static str, key: &Name, copies: &'a [Arc<T>]) -> &'a [Arc<T>] {
    match kept_copies(kind, key.namespace(), key.name(), copies, |c| &**c) {
        Ok(n) => &copies[..n],
        Err(_) => &[],
    }
}

/// The same object, or an equal one.
fn same<T: PartialEq>(a: &Arc<T>, b: &Arc<T>) -> bool {
    Arc::ptr_eq(a, b) || a == b
}

/// The same objects as `b`, in order, by identity only (cheap: a relist's unchanged objects).
fn identical<T>(a: &[Arc<T>], b: &[Arc<T>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(a, b)| Arc::ptr_eq(a, b))
}

/// How many times each `targetRef` name is listed for one address, sorted by name. Almost
/// always one name: a sorted list with room for one inline (no allocation; a vector's first
/// allocation has room for four, about 110 bytes), rather than a `BTreeMap`, whose first node
/// takes about 300 bytes, per endpoint address of the cluster.
#[derive(Debug, Default)]
struct NameCounts(SmallVec<[(Arc<str>, usize); 1]>);

impl NameCounts {
    /// Counts one more listing of `name` (shared with the group output that lists it).
    fn add(&mut self, name: &Arc<str>) {
        match self.0.binary_search_by(|(n, _)| (**n).cmp(name)) {
            Ok(i) => self.0[i].1 += 1,
            Err(i) => self.0.insert(i, (Arc::clone(name), 1)),
        }
    }

    /// Counts one listing of `name` less (none left: the name goes).
    fn take(&mut self, name: &str) {
        if let Ok(i) = self.0.binary_search_by(|(n, _)| (**n).cmp(name)) {
            self.0[i].1 -= 1;
            if self.0[i].1 == 0 {
                self.0.remove(i);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The smallest name listed.
    fn smallest(&self) -> Option<&Arc<str>> {
        self.0.first().map(|(n, _)| n)
    }
}

/// A sorted set of names: almost always one (a Service's one slice), so a sorted list with
/// room for one inline (no allocation) rather than a `BTreeSet`, whose first node takes about
/// 540 bytes.
#[derive(Debug, Default)]
struct SortedNames(SmallVec<[Name; 1]>);

impl SortedNames {
    fn insert(&mut self, name: Name) {
        if let Err(i) = self.0.binary_search(&name) {
            self.0.insert(i, name);
        }
    }

    fn remove(&mut self, name: &Name) {
        if let Ok(i) = self.0.binary_search(name) {
            self.0.remove(i);
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The names, sorted.
    fn iter(&self) -> std::slice::Iter<'_, Name> {
        self.0.iter()
    }
}

/// The copies of one object (namespace and name) a source lists: almost always one, held
/// inline (a vector's first allocation has room for four).
type Copies<T> = SmallVec<[Arc<T>; 1]>;

/// One Service group as last computed: its inputs and what it contributes.
#[derive(Debug)]
struct Group {
    service: Option<Arc<Svc>>,
    slices: Copies<Slice>,
    out: GroupOutput,
}

impl Group {
    /// Whether `compute_group` would give the same output for these inputs.
    fn same_inputs(&self, service: Option<&Arc<Svc>>, slices: &[Arc<Slice>]) -> bool {
        let same_service = match (&self.service, service) {
            (Some(a), Some(b)) => same(a, b),
            (None, None) => true,
            _ => false,
        };
        same_service
            && self.slices.len() == slices.len()
            && self.slices.iter().zip(slices).all(|(a, b)| same(a, b))
    }
}

/// One claim on a frontend key: the claim at index `claim` of group `group`'s output.
///
/// Ordered like `compute`'s merge visits claims: by group name, then claim index.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Claimant {
    group: Arc<Name>,
    claim: usize,
}

/// Who claims one frontend key.
#[derive(Debug, Default)]
struct KeyClaims {
    /// Sorted; the first owns the key. Almost always one, held inline.
    claimants: SmallVec<[Claimant; 1]>,
    /// The conflict error of each claimant after the first, in claimant order.
    conflicts: Vec<ObjectError>,
}

/// Whether a group's Service has node ports (`NodePort` or `LoadBalancer`): its frontends
/// depend on the node's addresses.
fn has_node_ports(group: &Group) -> bool {
    let type_ = group
        .service
        .as_ref()
        .and_then(|s| s.spec.as_ref()?.type_.as_deref());
    matches!(type_, Some("NodePort" | "LoadBalancer"))
}

/// The desired state of one node, maintained incrementally as objects change.
///
/// See the [module documentation](self) for the design. Changes are recorded with
/// [`set_service`](Self::set_service), [`set_slice`](Self::set_slice) and
/// [`set_nodes`](Self::set_nodes) (each cheap) and applied by [`update`](Self::update);
/// [`replace`](Self::replace) swaps in a whole object set.
#[derive(Debug)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "one flag per kind of pending work of the next update"
)]
pub struct Model {
    node_name: String,
    /// This node's zone, from `nodes` as of the last update.
    zone: Option<String>,
    /// Which node addresses serve `NodePort`s (a setting).
    which_nodeports: NodePortAddresses,
    /// The node-facing interfaces' addresses (`crate::hostaddrs`), as last given.
    host_addresses: Vec<IpAddr>,
    /// This node's `NodePort` addresses, from `nodes` and `host_addresses` as of the last
    /// update.
    nodeports: Vec<IpAddr>,

    // The current objects, by the identity `compute` gives them. Several copies only come
    // from `replace` (the file source may list an object twice).
    services: HashMap<Name, Copies<Svc>>,
    slices: HashMap<Name, Copies<Slice>>,
    nodes: Vec<Arc<Node>>,
    /// The slice keys whose used copies belong to each group.
    slices_by_owner: HashMap<Name, SortedNames>,

    // What the objects contribute.
    groups: HashMap<Arc<Name>, Box<Group>>,
    /// The ownership index: every claimed frontend key's claimants.
    claims: HashMap<FrontendKey, KeyClaims>,
    /// The keys with more than one claimant (their `conflicts` are errors).
    conflicted: BTreeSet<FrontendKey>,
    /// Per address, how many times each `targetRef` name is listed for it.
    names: HashMap<IpAddr, NameCounts>,
    /// The groups with errors.
    erring: BTreeSet<Arc<Name>>,
    /// The groups with topology notes.
    noting: BTreeSet<Arc<Name>>,
    /// The groups with a health-check node port.
    checking: BTreeSet<Arc<Name>>,
    /// The errors of Services whose health-check node port an earlier one has.
    health_conflicts: Vec<ObjectError>,
    /// Duplicate Services and slices whose copies differ.
    duplicate_services: HashMap<Name, ObjectError>,
    duplicate_slices: HashMap<Name, ObjectError>,
    /// The errors of the nameless Services of each namespace.
    nameless: HashMap<String, Vec<ObjectError>>,
    node_errors: Vec<ObjectError>,

    // What the next update has to do.
    dirty: HashSet<Name>,
    dirty_nameless: HashSet<String>,
    nodes_dirty: bool,
    errors_dirty: bool,
    notes_dirty: bool,
    health_dirty: bool,

    state: DesiredState,
    recomputed: usize,
}

impl Model {
    /// An empty model for the node named `node_name` (its state is that of no objects).
    #[must_use]
    pub fn new(node_name: &str) -> Self {
        Self::with_nodeport_addresses(node_name, NodePortAddresses::default())
    }

    /// An empty model for the node named `node_name` whose `NodePort`s listen on the node
    /// addresses `which` picks.
    #[must_use]
    pub fn with_nodeport_addresses(node_name: &str, which: NodePortAddresses) -> Self {
        Self {
            node_name: node_name.to_owned(),
            zone: None,
            which_nodeports: which,
            host_addresses: Vec::new(),
            nodeports: Vec::new(),
            services: HashMap::new(),
            slices: HashMap::new(),
            nodes: Vec::new(),
            slices_by_owner: HashMap::new(),
            groups: HashMap::new(),
            claims: HashMap::new(),
            conflicted: BTreeSet::new(),
            names: HashMap::new(),
            erring: BTreeSet::new(),
            noting: BTreeSet::new(),
            checking: BTreeSet::new(),
            health_conflicts: Vec::new(),
            duplicate_services: HashMap::new(),
            duplicate_slices: HashMap::new(),
            nameless: HashMap::new(),
            node_errors: Vec::new(),
            dirty: HashSet::new(),
            dirty_nameless: HashSet::new(),
            nodes_dirty: false,
            errors_dirty: false,
            notes_dirty: false,
            health_dirty: false,
            state: DesiredState::default(),
            recomputed: 0,
        }
    }

    /// The Service `namespace/name` is now `service` (None: deleted). Marks it dirty; O(1).
    ///
    /// `namespace/name` must be the Service's own (`default` when it names no namespace).
    pub fn set_service(&mut self, namespace: &str, name: &str, service: Option<Arc<Svc>>) {
        self.put_service(Name::new(namespace, name), service.into_iter().collect());
    }

    /// The `EndpointSlice` `namespace/name` is now `slice` (None: deleted). It belongs to the
    /// Service named by its `kubernetes.io/service-name` label ([`LABEL_SERVICE_NAME`](super::LABEL_SERVICE_NAME)); the
    /// model remembers each slice's last owner, so a relabel or delete dirties the old owner
    /// too. A slice without the label belongs to nobody.
    ///
    /// `namespace/name` must be the slice's own (`default` when it names no namespace).
    pub fn set_slice(&mut self, namespace: &str, name: &str, slice: Option<Arc<Slice>>) {
        self.put_slice(Name::new(namespace, name), slice.into_iter().collect());
    }

    /// The Node objects (only the one named like this node is used): `node_addresses`, their
    /// errors, and this node's zone (when it changes, the next update recomputes every
    /// Service).
    pub fn set_nodes(&mut self, nodes: Vec<Arc<Node>>) {
        self.nodes = nodes;
        self.nodes_dirty = true;
    }

    /// Which node addresses serve `NodePort`s.
    #[must_use]
    pub fn nodeport_setting(&self) -> &NodePortAddresses {
        &self.which_nodeports
    }

    /// The addresses of the node-facing interfaces are now `addresses` (sorted,
    /// deduplicated; `crate::hostaddrs`): with the Node's, they are the node addresses
    /// `NodePort`s serve. When they differ from the last ones, the next update recomputes the
    /// Services with node ports whose addresses change. Kept across [`replace`](Self::replace).
    pub fn set_host_addresses(&mut self, addresses: Vec<IpAddr>) {
        if addresses != self.host_addresses {
            self.host_addresses = addresses;
            self.nodes_dirty = true;
        }
    }

    /// This node's `NodePort` addresses as of the last update (the Node's and the node-facing
    /// interfaces' addresses `--nodeport-addresses` picks, [`nodeport_addresses`]).
    #[must_use]
    pub fn nodeport_addresses(&self) -> &[IpAddr] {
        &self.nodeports
    }

    /// The addresses of the node-facing interfaces the model was last given.
    #[must_use]
    pub fn host_addresses(&self) -> &[IpAddr] {
        &self.host_addresses
    }

    /// Recomputes only the dirty Services and returns what changed in [`state`](Self::state).
    pub fn update(&mut self) -> Delta {
        self.recomputed = 0;
        let mut delta = Delta::default();
        if self.dirty.is_empty()
            && self.dirty_nameless.is_empty()
            && !self.nodes_dirty
            && !self.errors_dirty
        {
            return delta;
        }

        // The zone and the NodePort addresses first: the groups are computed for them.
        let mut rezoned = false;
        let mut forced = HashSet::new();
        if self.nodes_dirty {
            let zone = node_zone(&self.nodes, &self.node_name);
            let nodeports = nodeport_addresses(
                &self.nodes,
                &self.node_name,
                &self.which_nodeports,
                &self.host_addresses,
            );
            if zone != self.zone {
                rezoned = true;
                self.dirty
                    .extend(self.groups.keys().map(|name| (**name).clone()));
            } else if nodeports != self.nodeports {
                // Only Services with node ports have frontends on node addresses.
                let with_node_ports = self.groups.iter().filter(|(_, g)| has_node_ports(g));
                let names: Vec<Name> = with_node_ports.map(|(n, _)| (**n).clone()).collect();
                forced.extend(names.iter().cloned());
                self.dirty.extend(names);
            }
            self.zone = zone;
            self.nodeports = nodeports;
        }
        let mut keys = BTreeSet::new();
        let mut addrs = BTreeSet::new();
        for group in std::mem::take(&mut self.dirty) {
            let force = rezoned || forced.contains(&group);
            self.update_group(group, force, &mut keys, &mut addrs);
        }
        for namespace in std::mem::take(&mut self.dirty_nameless) {
            self.update_nameless(namespace);
        }
        if std::mem::take(&mut self.nodes_dirty) {
            let (addresses, errors) = node_addresses(&self.nodes, &self.node_name);
            if addresses != self.state.node_addresses {
                self.state.node_addresses = addresses;
                delta.nodes = true;
            }
            if errors != self.node_errors {
                self.node_errors = errors;
                self.errors_dirty = true;
            }
        }
        if std::mem::take(&mut self.health_dirty) {
            self.collect_health_checks(&mut delta);
        }
        for key in keys {
            self.resolve_key(key, &mut delta);
        }
        for addr in addrs {
            self.resolve_name(addr, &mut delta);
        }
        if std::mem::take(&mut self.errors_dirty) {
            let errors = self.collect_errors();
            if errors != self.state.errors {
                self.state.errors = errors;
                delta.errors = true;
            }
        }
        if std::mem::take(&mut self.notes_dirty) {
            let notes = self.collect_notes();
            if notes != self.state.topology_notes {
                self.state.topology_notes = notes;
                delta.topology_notes = true;
            }
        }
        delta
    }

    /// Replaces the whole object set with `snapshot` (a relist, the standalone source, the
    /// periodic audit) and updates.
    ///
    /// Services whose Service object and slices are the same `Arc`s as before, or equal in
    /// content, are not recomputed (the model keeps the new `Arc`s). Duplicates in the
    /// snapshot (same kind, namespace and name) follow `compute`'s rule: identical copies
    /// merge; differing copies give an error and none is kept. Nameless Services are reported
    /// as by `compute`.
    pub fn replace(&mut self, snapshot: &Snapshot) -> Delta {
        let services = sorted_by_name(&snapshot.services, |s| {
            (s.metadata.namespace.as_deref(), s.metadata.name.as_deref())
        });
        let diff = replace_objects(&self.services, &services);
        for key in diff.removed {
            self.put_service(key, Copies::new());
        }
        for (key, copies) in diff.changed {
            self.put_service(key, copies);
        }
        let slices = sorted_by_name(&snapshot.slices, |s| {
            (s.namespace.as_deref(), s.name.as_deref())
        });
        let diff = replace_objects(&self.slices, &slices);
        for key in diff.removed {
            self.put_slice(key, Copies::new());
        }
        for (key, copies) in diff.changed {
            self.put_slice(key, copies);
        }
        if !identical(&self.nodes, &snapshot.nodes) {
            self.set_nodes(snapshot.nodes.clone());
        }
        self.update()
    }

    /// The whole desired state, maintained in place; always equal to
    /// [`compute`](super::compute) of the current objects for this node (once updated).
    #[must_use]
    pub fn state(&self) -> &DesiredState {
        &self.state
    }

    /// How many Services (with their slices) the last update recomputed; unchanged and
    /// deleted ones are not counted.
    #[must_use]
    pub fn recomputed(&self) -> usize {
        self.recomputed
    }

    /// Records the copies of the Service `key` (none: deleted) and marks what they affect.
    fn put_service(&mut self, key: Name, copies: Copies<Svc>) {
        debug_assert!(
            copies.iter().all(|s| Name::of(&s.metadata) == key),
            "a Service set under another name than its own: {key:?}"
        );
        if key.name().is_empty() {
            // Nameless Services are in no group: they only give errors.
            self.dirty_nameless.insert(key.namespace().to_owned());
        } else {
            set_duplicate(
                &mut self.duplicate_services,
                &mut self.errors_dirty,
                "Service",
                &key,
                &copies,
            );
            self.dirty.insert(key.clone());
        }
        if copies.is_empty() {
            self.services.remove(&key);
        } else {
            self.services.insert(key, copies);
        }
    }

    /// Records the copies of the slice `key` (none: deleted) and marks the groups they
    /// belonged to and belong to now.
    fn put_slice(&mut self, key: Name, copies: Copies<Slice>) {
        debug_assert!(
            copies.iter().all(|s| Name::of_slice(s) == key),
            "an EndpointSlice set under another name than its own: {key:?}"
        );
        let owners = |copies: &[Arc<Slice>]| -> Vec<Name> {
            let mut owners: Vec<Name> = kept("EndpointSlice", &key, copies)
                .iter()
                .filter_map(|s| owner_of(s))
                .collect();
            owners.sort();
            owners.dedup();
            owners
        };
        let before = self.slices.get(&key).map(|c| owners(c)).unwrap_or_default();
        let after = owners(&copies);
        for owner in &before {
            if !after.contains(owner)
                && let Some(keys) = self.slices_by_owner.get_mut(owner)
            {
                keys.remove(&key);
                if keys.is_empty() {
                    self.slices_by_owner.remove(owner);
                }
            }
        }
        for owner in &after {
            if !before.contains(owner) {
                self.slices_by_owner
                    .entry(owner.clone())
                    .or_default()
                    .insert(key.clone());
            }
        }
        self.dirty.extend(before);
        self.dirty.extend(after);
        set_duplicate(
            &mut self.duplicate_slices,
            &mut self.errors_dirty,
            "EndpointSlice",
            &key,
            &copies,
        );
        if copies.is_empty() {
            self.slices.remove(&key);
        } else {
            self.slices.insert(key, copies);
        }
    }

    /// Recomputes the group `name` if its inputs changed (or, `rezoned`, this node's zone),
    /// and records which frontend keys and addresses its change touches.
    fn update_group(
        &mut self,
        name: Name,
        rezoned: bool,
        keys: &mut BTreeSet<FrontendKey>,
        addrs: &mut BTreeSet<IpAddr>,
    ) {
        let service = if name.name().is_empty() {
            None
        } else {
            self.services
                .get(&name)
                .and_then(|copies| kept("Service", &name, copies).first())
                .cloned()
        };
        let mut slices = Copies::new();
        for key in self
            .slices_by_owner
            .get(&name)
            .into_iter()
            .flat_map(SortedNames::iter)
        {
            let copies = self.slices.get(key).map_or(&[][..], |c| c.as_slice());
            let mine = kept("EndpointSlice", key, copies)
                .iter()
                .filter(|s| owned_by(s, &name));
            slices.extend(mine.cloned());
        }
        let empty = service.is_none() && slices.is_empty();

        let (id, before) = match self.groups.remove_entry(&name) {
            Some((id, mut group)) => {
                if !rezoned && group.same_inputs(service.as_ref(), &slices) {
                    // Unchanged: keep the output, hold the new objects.
                    group.service = service;
                    group.slices = slices;
                    self.groups.insert(id, group);
                    return;
                }
                (id, group.out)
            }
            None if empty => return,
            None => (Arc::new(name), GroupOutput::default()),
        };
        let mut out = if empty {
            GroupOutput::default()
        } else {
            self.recomputed += 1;
            let refs: Vec<&Arc<Slice>> = slices.iter().collect();
            let place = Place::new(&self.node_name, self.zone.as_deref());
            compute_group(service.as_ref(), &refs, place, &self.nodeports)
        };

        if before.claims == out.claims {
            // The same frontends: keep the copies the desired state shares.
            out.claims = before.claims;
        } else {
            for claim in &before.claims {
                if let Some(entry) = self.claims.get_mut(&claim.key) {
                    entry.claimants.retain(|c| c.group != id);
                }
                keys.insert(claim.key);
            }
            for (index, claim) in out.claims.iter().enumerate() {
                let claimant = Claimant {
                    group: Arc::clone(&id),
                    claim: index,
                };
                let entry = self.claims.entry(claim.key).or_default();
                let at = entry.claimants.partition_point(|c| *c < claimant);
                entry.claimants.insert(at, claimant);
                keys.insert(claim.key);
            }
        }
        if before.names != out.names {
            self.move_names(&before.names, &out.names, addrs);
        }
        if before.errors != out.errors {
            self.errors_dirty = true;
            if out.errors.is_empty() {
                self.erring.remove(&id);
            } else {
                self.erring.insert(Arc::clone(&id));
            }
        }
        if before.health_check != out.health_check {
            self.health_dirty = true;
            if out.health_check.is_none() {
                self.checking.remove(&id);
            } else {
                self.checking.insert(Arc::clone(&id));
            }
        }
        if before.topology_notes != out.topology_notes {
            self.notes_dirty = true;
            if out.topology_notes.is_empty() {
                self.noting.remove(&id);
            } else {
                self.noting.insert(Arc::clone(&id));
            }
        }
        if !empty {
            self.groups.insert(
                id,
                Box::new(Group {
                    service,
                    slices,
                    out,
                }),
            );
        }
    }

    /// Replaces a group's `targetRef` names `before` with `after` in the per-address
    /// multisets, recording the addresses touched.
    fn move_names(
        &mut self,
        before: &[(IpAddr, Arc<str>)],
        after: &[(IpAddr, Arc<str>)],
        addrs: &mut BTreeSet<IpAddr>,
    ) {
        for (addr, target) in before {
            if let Some(counts) = self.names.get_mut(addr) {
                counts.take(target);
                if counts.is_empty() {
                    self.names.remove(addr);
                }
            }
            addrs.insert(*addr);
        }
        for (addr, target) in after {
            self.names.entry(*addr).or_default().add(target);
            addrs.insert(*addr);
        }
    }

    /// Recomputes the errors of the nameless Services of `namespace`.
    fn update_nameless(&mut self, namespace: String) {
        let mut errors = Vec::new();
        let key = Name::new(&namespace, "");
        for service in self.services.get(&key).into_iter().flatten() {
            self.recomputed += 1;
            let place = Place::new(&self.node_name, self.zone.as_deref());
            let out = compute_group(Some(service), &[], place, &self.nodeports);
            // A Service without a name never validates, so it claims and notes nothing.
            debug_assert!(
                out.claims.is_empty() && out.names.is_empty() && out.topology_notes.is_empty()
            );
            errors.extend(out.errors);
        }
        let before = if errors.is_empty() {
            self.nameless.remove(&namespace)
        } else {
            self.nameless.insert(namespace, errors.clone())
        };
        if before.unwrap_or_default() != errors {
            self.errors_dirty = true;
        }
    }

    /// Re-resolves the frontend key `key` from its claimants: the owner's frontend into the
    /// state, the others' conflict errors.
    fn resolve_key(&mut self, key: FrontendKey, delta: &mut Delta) {
        let groups = &self.groups;
        let claim = |c: &Claimant| &groups[&c.group].out.claims[c.claim];
        let Some(entry) = self.claims.get_mut(&key) else {
            return;
        };
        let owner = entry.claimants.first().map(claim);
        match owner {
            Some(owner) => match self.state.frontends.get_mut(&key) {
                Some(current) if *current == owner.frontend => {
                    // Recomputed the same: hold the owner's copy, so there is one.
                    *current = Arc::clone(&owner.frontend);
                }
                Some(current) => {
                    *current = Arc::clone(&owner.frontend);
                    delta.frontends.insert(key);
                }
                None => {
                    self.state
                        .frontends
                        .insert(key, Arc::clone(&owner.frontend));
                    delta.frontends.insert(key);
                }
            },
            None => {
                if self.state.frontends.remove(&key).is_some() {
                    delta.frontends.insert(key);
                }
            }
        }
        let conflicts: Vec<ObjectError> = match owner {
            Some(owner) => entry.claimants[1..]
                .iter()
                .map(|c| conflict_error(claim(c), &owner.frontend.service))
                .collect(),
            None => Vec::new(),
        };
        if conflicts != entry.conflicts {
            self.errors_dirty = true;
            if conflicts.is_empty() {
                self.conflicted.remove(&key);
            } else {
                self.conflicted.insert(key);
            }
            entry.conflicts = conflicts;
        }
        if entry.claimants.is_empty() {
            self.claims.remove(&key);
        }
    }

    /// Re-resolves the name of the endpoint address `addr`: the smallest listed.
    fn resolve_name(&mut self, addr: IpAddr, delta: &mut Delta) {
        let smallest = self.names.get(&addr).and_then(NameCounts::smallest);
        if self.state.backend_names.get(&addr) == smallest {
            return;
        }
        match smallest {
            Some(name) => {
                self.state.backend_names.insert(addr, name.clone());
            }
            None => {
                self.state.backend_names.remove(&addr);
            }
        }
        delta.backend_names.insert(addr);
    }

    /// Every error, sorted and deduplicated, from the parts.
    fn collect_errors(&self) -> Vec<ObjectError> {
        let groups = self.erring.iter().flat_map(|g| &self.groups[g].out.errors);
        let conflicts = self
            .conflicted
            .iter()
            .flat_map(|k| &self.claims[k].conflicts);
        let mut errors: Vec<ObjectError> = self
            .duplicate_services
            .values()
            .chain(self.duplicate_slices.values())
            .chain(self.nameless.values().flatten())
            .chain(groups)
            .chain(conflicts)
            .chain(&self.health_conflicts)
            .chain(&self.node_errors)
            .cloned()
            .collect();
        errors.sort();
        errors.dedup();
        errors
    }

    /// Rebuilds `health_checks` from the groups that have one (in name order, so a port two
    /// Services name is the first's, as in `compute`) and their conflicts.
    fn collect_health_checks(&mut self, delta: &mut Delta) {
        let mut checks = BTreeMap::new();
        let mut conflicts = Vec::new();
        for group in &self.checking {
            let out = &self.groups[group].out;
            merge_health_check(out, &mut checks, &mut conflicts);
        }
        if checks != self.state.health_checks {
            self.state.health_checks = checks;
            delta.health_checks = true;
        }
        if conflicts != self.health_conflicts {
            self.health_conflicts = conflicts;
            self.errors_dirty = true;
        }
    }

    /// Every topology note, sorted and deduplicated, from the groups'.
    fn collect_notes(&self) -> Vec<TopologyNote> {
        let mut notes: Vec<TopologyNote> = (self.noting.iter())
            .flat_map(|g| &self.groups[g].out.topology_notes)
            .cloned()
            .collect();
        notes.sort();
        notes.dedup();
        notes
    }
}

/// What a whole new object set changes in a store of objects.
struct Replacement<T> {
    /// Names no longer in the set.
    removed: Vec<Name>,
    /// Names whose copies are not the same objects as before, with their new copies.
    changed: Vec<(Name, Copies<T>)>,
}

/// Compares the objects of a store with `objects` (sorted by name, see `sorted_by_name`),
/// allocating only for what changed.
fn replace_objects<T>(
    store: &HashMap<Name, Copies<T>>,
    objects: &[(&str, &str, &Arc<T>)],
) -> Replacement<T> {
    let mut replacement = Replacement {
        removed: Vec::new(),
        changed: Vec::new(),
    };
    let mut present = 0;
    for copies in objects.chunk_by(|a, b| (a.0, a.1) == (b.0, b.1)) {
        let (namespace, name, _) = copies[0];
        let old = store.get(&(namespace, name) as &dyn NameKey);
        present += usize::from(old.is_some());
        let same = old.is_some_and(|old| {
            old.len() == copies.len() && old.iter().zip(copies).all(|(a, b)| Arc::ptr_eq(a, b.2))
        });
        if !same {
            let copies = copies.iter().map(|c| Arc::clone(c.2)).collect();
            replacement
                .changed
                .push((Name::new(namespace, name), copies));
        }
    }
    if present < store.len() {
        replacement.removed = (store.keys())
            .filter(|key| {
                let key = key.parts();
                objects.binary_search_by(|o| (o.0, o.1).cmp(&key)).is_err()
            })
            .cloned()
            .collect();
    }
    replacement
}

/// Records whether the copies of object `key` differ (an error in `duplicates`), flagging
/// `errors_dirty` when that changed.
fn set_duplicate<T: PartialEq>(
    duplicates: &mut HashMap<Name, ObjectError>,
    errors_dirty: &mut bool,
    kind: &'static str,
    key: &Name,
    copies: &[Arc<T>],
) {
    match kept_copies(kind, key.namespace(), key.name(), copies, |c| &**c) {
        Ok(_) => {
            if duplicates.remove(key).is_some() {
                *errors_dirty = true;
            }
        }
        Err(error) => {
            if duplicates.get(key) != Some(&error) {
                duplicates.insert(key.clone(), error);
                *errors_dirty = true;
            }
        }
    }
}

/// Objects with several copies (the file source; added for the standalone passes, issue 10).
impl Model {
    /// The Service `namespace/name` is now `copies` (empty: deleted), in the source's order:
    /// [`set_service`](Self::set_service) for a source that may hold one object more than
    /// once (a directory: the same Service in two files). Copies follow `compute`'s rule, as
    /// in [`replace`](Self::replace): identical copies are one object, differing copies an
    /// error and none is used. Marks it dirty.
    ///
    /// `namespace/name` must be every copy's own (`default` when it names no namespace).
    pub fn set_service_copies(&mut self, namespace: &str, name: &str, copies: Vec<Arc<Svc>>) {
        self.put_service(Name::new(namespace, name), copies.into_iter().collect());
    }

    /// The `EndpointSlice` `namespace/name` is now `copies` (empty: deleted), in the source's
    /// order: [`set_slice`](Self::set_slice) for a source that may hold one object more than
    /// once, with the rule of [`set_service_copies`](Self::set_service_copies).
    ///
    /// `namespace/name` must be every copy's own (`default` when it names no namespace).
    pub fn set_slice_copies(&mut self, namespace: &str, name: &str, copies: Vec<Arc<Slice>>) {
        self.put_slice(Name::new(namespace, name), copies.into_iter().collect());
    }
}

#[cfg(test)]
mod tests;
