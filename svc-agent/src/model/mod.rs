//! Desired-state model: Kubernetes objects in, frontends and backends out (pure functions).
//!
//! [`compute`] turns a [`Snapshot`] of Services, `EndpointSlice`s and Nodes into a
//! [`DesiredState`]: one [`Frontend`] per (virtual address, port, protocol, scope) with the
//! backends new connections may choose from, the backends whose established connections must
//! keep working, and what to do when there is no backend. The reconciler diffs this against the
//! BPF maps; nothing here touches the kernel, the network or a clock, and the output depends
//! only on the set of input objects, never on their order.
//!
//! [`Model`] maintains the same result incrementally: told which objects changed, it
//! recomputes only their Services and reports what changed as a [`Delta`]; `compute` is its
//! oracle (see `incremental.rs`).
//!
//! Objects that fail validation are reported in [`DesiredState::errors`] (one [`ObjectError`]
//! per bad field) and skipped; everything else is still produced. The rules follow kube-proxy
//! (see `shared/notes/service-semantics.md`); each deliberate difference is documented where it
//! is implemented:
//! - duplicate objects (same kind, namespace and name, different content; possible with the
//!   file source) are all skipped with an error, so the result does not depend on order;
//! - an address:port listed in several slices is merged deterministically (see
//!   `endpoints.rs`);
//! - two Services claiming the same frontend: the first by namespace/name keeps it.
//!
//! Topology-aware routing follows kube-proxy (`pkg/proxy/topology.go`): `EndpointSlice`
//! `hints.forNodes` / `hints.forZones` with this node's name and its Node's
//! `topology.kubernetes.io/zone` label narrow the endpoints new connections of a frontend
//! using the cluster's endpoints may choose (rules in `endpoints.rs`); when hints are present
//! but cannot be used, all endpoints are used and [`DesiredState::topology_notes`] says why.

mod delta;
mod endpoints;
mod error;
mod frontend;
mod incremental;
pub mod intern;
mod node;
mod pods;
mod service;
mod slice;
mod svc;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, btree_map::Entry},
    net::IpAddr,
    sync::Arc,
};

pub use delta::Delta;
pub use endpoints::HintsIgnored;
pub use error::ObjectError;
pub use frontend::{
    Backend, DropReason, EmptyAction, Frontend, FrontendKey, FrontendKind, Protocol, Scope,
    ServicePortRef,
};
pub use incremental::Model;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
pub use node::{
    NodeAddress, NodeAddressKind, NodePortAddresses, node_addresses, node_zone, nodeport_addresses,
};
pub use pods::{
    HandWrittenSlices, IgnoredSlice, LABEL_MANAGED_BY, MANAGED_BY, MAX_ENDPOINTS_PER_SLICE,
    PodSliceChanges, PodSlicer, PodSlices, Selection, slices_from_pods,
};
pub use slice::{Slice, SliceEndpoint, SliceHints, SlicePort, Target};
pub use svc::{Svc, SvcLbIngress, SvcMeta, SvcPort, SvcSpec};

use ipnet::IpNet;

use self::{
    endpoints::{Place, SliceIndex, select_backends},
    service::{ServiceView, TrafficPolicy},
};

/// The label that links an `EndpointSlice` to its Service (same namespace).
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Services with this label (any value) belong to another proxy and are ignored.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Services with this label (any value) are headless: nothing to program.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// The Node label naming the node's zone (topology hints for zones match it).
pub const LABEL_TOPOLOGY_ZONE: &str = "topology.kubernetes.io/zone";
/// The namespace of an object that names none (what `kubectl apply` uses by default).
pub const DEFAULT_NAMESPACE: &str = "default";

/// The Kubernetes objects the desired state is computed from.
///
/// The order of the objects does not matter. Objects of the same kind, namespace and name
/// appearing more than once are merged when identical and rejected when they differ.
#[derive(Clone, Debug, Default, PartialEq)]
///
/// Objects are shared (`Arc`) so a source that caches them (the Kubernetes reflectors) builds a
/// snapshot without copying any object.
pub struct Snapshot {
    /// `v1` Services, as the model keeps them.
    pub services: Vec<Arc<Svc>>,
    /// `discovery.k8s.io/v1` `EndpointSlice`s, as the model keeps them.
    pub slices: Vec<Arc<Slice>>,
    /// `v1` Nodes (only the one named like this node is used).
    pub nodes: Vec<Arc<Node>>,
}

impl Snapshot {
    /// A snapshot of owned objects.
    #[must_use]
    pub fn new(services: Vec<Service>, slices: Vec<EndpointSlice>, nodes: Vec<Node>) -> Self {
        Self {
            services: services.into_iter().map(|s| Arc::new(s.into())).collect(),
            slices: slices.into_iter().map(|s| Arc::new(s.into())).collect(),
            nodes: nodes.into_iter().map(Arc::new).collect(),
        }
    }
}

/// `slices` as the model keeps them ([`Slice`]).
#[must_use]
pub fn lean_slices(slices: &[Arc<EndpointSlice>]) -> Vec<Arc<Slice>> {
    slices.iter().map(|s| Arc::new(Slice::from(&**s))).collect()
}

/// What the dataplane of one node should do, computed by [`compute`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    /// Every virtual address the dataplane captures, with its backends.
    pub frontends: BTreeMap<FrontendKey, Arc<Frontend>>,
    /// This node's addresses (from its Node object), sorted; where `NodePorts` will listen.
    pub node_addresses: Vec<NodeAddress>,
    /// Who is behind each endpoint address: `namespace/name` of its `targetRef` in the
    /// `EndpointSlice`s (a Pod), for the debug tool. An address two slices name differently
    /// gets the smaller name.
    pub backend_names: BTreeMap<IpAddr, Arc<str>>,
    /// The health-check node ports to serve (`spec.healthCheckNodePort` of Services with
    /// `externalTrafficPolicy: Local`), by port; a port two Services name belongs to the
    /// first by namespace/name.
    pub health_checks: BTreeMap<u16, HealthCheck>,
    /// Objects (or parts of objects) that were skipped, sorted and deduplicated.
    pub errors: Vec<ObjectError>,
    /// Services whose endpoints carry topology hints this node does not use (it uses all
    /// endpoints instead, as kube-proxy does), with why; sorted and deduplicated. Not errors:
    /// the Services are programmed.
    pub topology_notes: Vec<TopologyNote>,
}

/// What a health-check node port answers for its Service (kube-proxy's health check server):
/// 200 while this node has a ready endpoint of it, 503 otherwise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    /// The Service's namespace.
    pub namespace: Arc<str>,
    /// The Service's name.
    pub name: Arc<str>,
    /// Its ready endpoints on this node (of the port and family that has the most).
    pub local_endpoints: usize,
}

/// A Service whose topology hints this node ignores, and why (see [`HintsIgnored`]).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopologyNote {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub name: String,
    /// Why its hints are not used.
    pub why: HintsIgnored,
}

impl std::fmt::Display for TopologyNote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Service {}/{}: topology hints ignored, every endpoint is used: {}",
            self.namespace, self.name, self.why
        )
    }
}

/// Computes the desired state of the node named `node_name` from `snapshot`.
///
/// Never panics; bad objects end up in [`DesiredState::errors`]. The result is identical for
/// any order of the objects in `snapshot`.
#[must_use]
pub fn compute(snapshot: &Snapshot, node_name: &str) -> DesiredState {
    compute_with(snapshot, node_name, &mut Memo::default())
}

/// Per-Service results of [`compute_with`], kept between passes.
///
/// A Service's frontends and errors depend only on the Service, its `EndpointSlice`s and the
/// node's name and zone (a change of either starts the memo afresh). A source that hands out
/// the same shared objects while they are unchanged (the Kubernetes reflectors do: an
/// object's `Arc` is replaced when it changes) gets each unchanged Service's result from here
/// instead of recomputing it, so a pass costs in proportion to what changed, plus a walk over
/// the names. Objects are compared by identity
/// (`Arc::ptr_eq`); the memo holds them, so an address cannot be reused by another object.
#[derive(Debug, Default)]
pub struct Memo {
    /// Which node addresses serve `NodePort`s (a setting, kept across resets).
    which_nodeports: NodePortAddresses,
    /// The node-facing interfaces' addresses (`crate::hostaddrs`; kept across resets).
    host_addresses: Vec<IpAddr>,
    node_name: String,
    zone: Option<String>,
    /// This node's `NodePort` addresses as of the last pass.
    nodeports: Vec<IpAddr>,
    /// By namespace, then by Service name.
    groups: HashMap<String, HashMap<String, MemoEntry>>,
    /// How many Services the last pass computed (the others were reused).
    recomputed: usize,
}

impl Memo {
    /// An empty memo for passes whose `NodePort`s listen on the node addresses `which` picks
    /// (the default memo: every node address).
    #[must_use]
    pub fn with_nodeport_addresses(which: NodePortAddresses) -> Self {
        Self {
            which_nodeports: which,
            ..Self::default()
        }
    }

    /// The same memo for passes where the node-facing interfaces have `addresses` (they
    /// serve `NodePort`s with the Node's, see [`nodeport_addresses`]).
    #[must_use]
    pub fn with_host_addresses(mut self, addresses: Vec<IpAddr>) -> Self {
        self.host_addresses = addresses;
        self
    }

    /// Starts afresh when the node's name, zone or `NodePort` addresses changed (every result
    /// depends on them).
    fn prepare(&mut self, node_name: &str, zone: Option<String>, nodeports: Vec<IpAddr>) {
        if self.node_name != node_name || self.zone != zone || self.nodeports != nodeports {
            *self = Self {
                which_nodeports: std::mem::take(&mut self.which_nodeports),
                host_addresses: std::mem::take(&mut self.host_addresses),
                node_name: node_name.to_owned(),
                zone,
                nodeports,
                ..Self::default()
            };
        }
    }

    /// How many Services (with their slices) the last pass had to compute; the others were
    /// unchanged and reused.
    #[must_use]
    pub fn recomputed(&self) -> usize {
        self.recomputed
    }
}

#[derive(Debug)]
struct MemoEntry {
    service: Option<Arc<Svc>>,
    slices: Vec<Arc<Slice>>,
    out: GroupOutput,
}

impl MemoEntry {
    fn matches(&self, service: Option<&Arc<Svc>>, slices: &[&Arc<Slice>]) -> bool {
        let same_service = match (&self.service, service) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        same_service
            && self.slices.len() == slices.len()
            && self
                .slices
                .iter()
                .zip(slices)
                .all(|(a, b)| Arc::ptr_eq(a, b))
    }
}

/// What one Service (with its slices) contributes, before conflicts with other Services are
/// resolved.
#[derive(Clone, Debug, Default, PartialEq)]
struct GroupOutput {
    claims: Vec<Claim>,
    errors: Vec<ObjectError>,
    topology_notes: Vec<TopologyNote>,
    /// The `targetRef` names of the slices' endpoints, by address.
    names: Vec<(IpAddr, Arc<str>)>,
    /// The Service's `healthCheckNodePort` and what it answers.
    health_check: Option<(u16, HealthCheck)>,
}

/// A frontend a Service asks for; the first Service (by namespace/name) to claim a key gets it.
#[derive(Clone, Debug, PartialEq)]
struct Claim {
    key: FrontendKey,
    frontend: Arc<Frontend>,
    /// The field to blame if the key is taken.
    field: ClaimField,
    /// The index of the port in `spec.ports`.
    port_index: usize,
}

/// The field of a Service a claim comes from (text only for an error: a claim is kept per
/// frontend for as long as its Service exists).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClaimField {
    /// `spec.clusterIP` (a Service without `clusterIPs`).
    ClusterIp,
    /// `spec.clusterIPs[i]`.
    ClusterIps(usize),
    /// `spec.ports[i].nodePort`.
    NodePort(usize),
    /// `spec.externalIPs[i]`.
    ExternalIps(usize),
    /// `status.loadBalancer.ingress[i].ip`.
    LbIngress(usize),
}

impl std::fmt::Display for ClaimField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ClusterIp => f.write_str("spec.clusterIP"),
            Self::ClusterIps(i) => write!(f, "spec.clusterIPs[{i}]"),
            Self::NodePort(i) => write!(f, "spec.ports[{i}].nodePort"),
            Self::ExternalIps(i) => write!(f, "spec.externalIPs[{i}]"),
            Self::LbIngress(i) => write!(f, "status.loadBalancer.ingress[{i}].ip"),
        }
    }
}

/// A Service and the slices that name it (either may be missing).
#[derive(Default)]
struct Group<'a> {
    service: Option<&'a Arc<Svc>>,
    slices: Vec<&'a Arc<Slice>>,
}

/// [`compute`], reusing the results of Services unchanged since the last pass with `memo`.
/// The result is exactly what [`compute`] returns for the same snapshot.
pub fn compute_with(snapshot: &Snapshot, node_name: &str, memo: &mut Memo) -> DesiredState {
    let mut errors = Vec::new();
    let nodeports = nodeport_addresses(
        &snapshot.nodes,
        node_name,
        &memo.which_nodeports,
        &memo.host_addresses,
    );
    memo.prepare(node_name, node_zone(&snapshot.nodes, node_name), nodeports);
    let zone = memo.zone.clone();
    let nodeports = memo.nodeports.clone();
    let place = Place::new(node_name, zone.as_deref());

    let services = unique_objects(
        "Service",
        &snapshot.services,
        |s| (s.metadata.namespace.as_deref(), s.metadata.name.as_deref()),
        &mut errors,
    );
    let slices = unique_objects(
        "EndpointSlice",
        &snapshot.slices,
        |s| (s.namespace.as_deref(), s.name.as_deref()),
        &mut errors,
    );
    // Each Service with the slices naming it, sorted by namespace/name, so conflicts are
    // resolved the same way whatever the input order. Nameless Services (each reported as
    // invalid) are computed one by one, never memoized.
    let mut groups: BTreeMap<(&str, &str), Group<'_>> = BTreeMap::new();
    let mut nameless = Vec::new();
    for svc in services {
        let namespace = namespace_of(svc.metadata.namespace.as_deref());
        match svc.metadata.name.as_deref().filter(|n| !n.is_empty()) {
            Some(name) => groups.entry((namespace, name)).or_default().service = Some(svc),
            None => nameless.push(svc),
        }
    }
    for slice in slices {
        if let Some(owner) = slice_owner(slice) {
            groups.entry(owner).or_default().slices.push(slice);
        }
    }

    let mut frontends = BTreeMap::new();
    let mut backend_names: BTreeMap<IpAddr, Arc<str>> = BTreeMap::new();
    let mut topology_notes = BTreeSet::new();
    let mut health_checks = BTreeMap::new();
    for svc in nameless {
        let out = compute_group(Some(svc), &[], place, &nodeports);
        merge(&out, &mut frontends, &mut errors);
    }
    let mut next: HashMap<String, HashMap<String, MemoEntry>> = HashMap::new();
    memo.recomputed = 0;
    for ((namespace, name), group) in groups {
        let kept = memo
            .groups
            .get_mut(namespace)
            .and_then(|names| names.remove_entry(name))
            .filter(|(_, entry)| entry.matches(group.service, &group.slices));
        let (name, entry) = kept.unwrap_or_else(|| {
            memo.recomputed += 1;
            let entry = MemoEntry {
                out: compute_group(group.service, &group.slices, place, &nodeports),
                service: group.service.cloned(),
                slices: group.slices.into_iter().cloned().collect(),
            };
            (name.to_owned(), entry)
        });
        merge(&entry.out, &mut frontends, &mut errors);
        merge_health_check(&entry.out, &mut health_checks, &mut errors);
        topology_notes.extend(entry.out.topology_notes.iter().cloned());
        for (addr, name) in &entry.out.names {
            backend_names
                .entry(*addr)
                .and_modify(|kept| {
                    if name < kept {
                        kept.clone_from(name);
                    }
                })
                .or_insert_with(|| name.clone());
        }
        match next.get_mut(namespace) {
            Some(names) => {
                names.insert(name, entry);
            }
            None => {
                next.insert(namespace.to_owned(), HashMap::from([(name, entry)]));
            }
        }
    }
    memo.groups = next;

    let (node_addresses, node_errors) = node_addresses(&snapshot.nodes, node_name);
    errors.extend(node_errors);
    errors.sort();
    errors.dedup();
    DesiredState {
        frontends,
        node_addresses,
        backend_names,
        health_checks,
        errors,
        topology_notes: topology_notes.into_iter().collect(),
    }
}

/// Validates one Service and its slices and lists the frontends it claims, on a node whose
/// `NodePort` addresses are `nodeports`.
fn compute_group(
    service: Option<&Arc<Svc>>,
    slices: &[&Arc<Slice>],
    place: Place<'_>,
    nodeports: &[IpAddr],
) -> GroupOutput {
    let mut out = GroupOutput::default();
    let slices: Vec<&Slice> = slices.iter().map(|s| &***s).collect();
    let slice_index = SliceIndex::build(&slices, place, &mut out.errors);
    if let Some(view) = service.and_then(|svc| ServiceView::parse(svc, &mut out.errors)) {
        service_claims(&view, &slice_index, place.zone, nodeports, &mut out);
        out.names = endpoints::target_names(&slices);
    }
    // Kept per Service for as long as it exists: no room for growth (a vector grown by pushes
    // holds up to twice what it needs; the claims alone took 27 MB at 30,000 Services).
    out.claims.shrink_to_fit();
    out.errors.shrink_to_fit();
    out.topology_notes.shrink_to_fit();
    out.names.shrink_to_fit();
    out
}

/// Adds one Service's claims to `frontends`; a key already taken by an earlier Service (or an
/// earlier port of the same one) is reported on the later claim's field.
fn merge(
    out: &GroupOutput,
    frontends: &mut BTreeMap<FrontendKey, Arc<Frontend>>,
    errors: &mut Vec<ObjectError>,
) {
    errors.extend(out.errors.iter().cloned());
    for claim in &out.claims {
        match frontends.entry(claim.key) {
            Entry::Vacant(slot) => {
                slot.insert(claim.frontend.clone());
            }
            Entry::Occupied(taken) => errors.push(conflict_error(claim, &taken.get().service)),
        }
    }
}

/// Adds one Service's health-check node port to `health_checks`; a port already taken by an
/// earlier Service is reported on the later one.
fn merge_health_check(
    out: &GroupOutput,
    health_checks: &mut BTreeMap<u16, HealthCheck>,
    errors: &mut Vec<ObjectError>,
) {
    let Some((port, check)) = &out.health_check else {
        return;
    };
    match health_checks.entry(*port) {
        Entry::Vacant(slot) => {
            slot.insert(check.clone());
        }
        Entry::Occupied(taken) => errors.push(health_check_conflict(*port, check, taken.get())),
    }
}

/// The error reported on the Service `later` when its health-check node port is `owner`'s.
fn health_check_conflict(port: u16, later: &HealthCheck, owner: &HealthCheck) -> ObjectError {
    ObjectError {
        kind: "Service",
        namespace: later.namespace.to_string(),
        name: later.name.to_string(),
        field: "spec.healthCheckNodePort".to_owned(),
        reason: format!(
            "{port} is already the health-check node port of Service {}/{}",
            owner.namespace, owner.name
        ),
    }
}

/// The error reported on `claim` when its key is already taken by the Service port `owner`.
fn conflict_error(claim: &Claim, owner: &ServicePortRef) -> ObjectError {
    let me = &claim.frontend.service;
    ObjectError {
        kind: "Service",
        namespace: me.namespace.to_string(),
        name: me.name.to_string(),
        field: claim.field.to_string(),
        reason: format!(
            "{} (spec.ports[{}]) is already used by Service {}/{} port {:?}",
            claim.key, claim.port_index, owner.namespace, owner.name, owner.port_name
        ),
    }
}

/// The frontends of one validated Service on a node whose `NodePort` addresses are
/// `nodeports`.
///
/// Every served `ClusterIP` (scope [`Scope::Internal`], `internalTrafficPolicy`). Then every
/// external address: each of `spec.externalIPs`, each load balancer ingress IP, and (for
/// `NodePort` and `LoadBalancer` Services) each node address at the ports' `nodePort`s, of a
/// family the Service serves. An external address gets two frontends: scope
/// [`Scope::External`] for traffic from outside (`externalTrafficPolicy`; source ranges on load
/// balancer IPs), and scope [`Scope::Internal`] for pods and host processes reaching it, which
/// may use every endpoint of the cluster, as kube-proxy serves them.
fn service_claims(
    view: &ServiceView<'_>,
    slices: &SliceIndex<'_>,
    zone: Option<&str>,
    nodeports: &[IpAddr],
    out: &mut GroupOutput,
) {
    let claimer = Claimer {
        view,
        slices,
        zone,
        namespace: intern::intern(view.namespace),
        name: view.name.into(),
        port_names: view.ports.iter().map(|p| intern::intern(p.name)).collect(),
    };
    for (ip_index, &addr) in view.cluster_ips.iter().enumerate() {
        if !view.serves(addr) {
            continue;
        }
        for (pos, port) in view.ports.iter().enumerate() {
            let what = ClaimWhat {
                scope: Scope::Internal,
                kind: FrontendKind::ClusterIp,
                policy: view.internal_traffic_policy,
                local_drop: DropReason::InternalTrafficPolicyLocal,
                source_ranges: &[],
                field: view.cluster_ip_field(ip_index),
            };
            claimer.claim(out, addr, pos, port.port, &what);
        }
    }
    external_claims(&claimer, nodeports, out);
    if let Some(port) = view.health_check_node_port
        && view.external_traffic_policy == TrafficPolicy::Local
    {
        out.health_check = Some((
            port,
            HealthCheck {
                namespace: Arc::clone(&claimer.namespace),
                name: Arc::clone(&claimer.name),
                local_endpoints: local_ready_endpoints(view, slices),
            },
        ));
    }
}

/// The frontends of a Service's external addresses (see [`service_claims`]).
fn external_claims(claimer: &Claimer<'_, '_>, nodeports: &[IpAddr], out: &mut GroupOutput) {
    let view = claimer.view;
    let served_families: Vec<bool> = (view.cluster_ips.iter())
        .filter(|&&a| view.serves(a))
        .map(IpAddr::is_ipv6)
        .collect();
    let external = (view.external_ips.iter())
        .map(|&(i, a)| (a, FrontendKind::ExternalIp, ClaimField::ExternalIps(i)))
        .chain(
            (view.lb_ips.iter())
                .map(|&(i, a)| (a, FrontendKind::LoadBalancerIp, ClaimField::LbIngress(i))),
        )
        .chain(
            (nodeports.iter())
                .filter(|_| view.has_node_ports())
                .map(|&a| (a, FrontendKind::NodePort, ClaimField::ClusterIp)),
        );
    for (addr, kind, field) in external {
        if !served_families.contains(&addr.is_ipv6()) {
            continue;
        }
        for (pos, port) in view.ports.iter().enumerate() {
            let (number, field) = match kind {
                FrontendKind::NodePort => match port.node_port {
                    Some(n) => (n, ClaimField::NodePort(port.index)),
                    None => continue,
                },
                _ => (port.port, field),
            };
            for scope in [Scope::External, Scope::Internal] {
                let outside = scope == Scope::External;
                let what = ClaimWhat {
                    scope,
                    kind,
                    policy: if outside {
                        view.external_traffic_policy
                    } else {
                        TrafficPolicy::Cluster
                    },
                    local_drop: DropReason::ExternalTrafficPolicyLocal,
                    source_ranges: if outside && kind == FrontendKind::LoadBalancerIp {
                        &view.source_ranges
                    } else {
                        &[]
                    },
                    field,
                };
                claimer.claim(out, addr, pos, number, &what);
            }
        }
    }
}

/// What a Service's health-check node port reports: its ready endpoints on this node, for the
/// port and family that has the most (kube-proxy counts ready local endpoints; a terminating
/// one does not count, so load balancers leave a node whose endpoints are all going away).
fn local_ready_endpoints(view: &ServiceView<'_>, slices: &SliceIndex<'_>) -> usize {
    let mut most = 0;
    for &addr in view.cluster_ips.iter().filter(|&&a| view.serves(a)) {
        for port in &view.ports {
            let endpoints =
                slices.endpoints(view.namespace, view.name, addr, port.name, port.proto);
            let ready = (endpoints.iter())
                .filter(|c| c.local && c.conditions.ready)
                .count();
            most = most.max(ready);
        }
    }
    most
}

/// Claims the frontends of one validated Service (what they share).
struct Claimer<'v, 'a> {
    view: &'v ServiceView<'a>,
    slices: &'v SliceIndex<'a>,
    zone: Option<&'v str>,
    namespace: Arc<str>,
    name: Arc<str>,
    /// Of `view.ports`, by position.
    port_names: Vec<Arc<str>>,
}

impl Claimer<'_, '_> {
    /// Claims `addr:number` for the port at `pos` in `view.ports`, as `what` says.
    fn claim(
        &self,
        out: &mut GroupOutput,
        addr: IpAddr,
        pos: usize,
        number: u16,
        what: &ClaimWhat<'_>,
    ) {
        let view = self.view;
        let port = &view.ports[pos];
        let endpoints =
            self.slices
                .endpoints(view.namespace, view.name, addr, port.name, port.proto);
        let selection = select_backends(&endpoints, what.policy, self.zone);
        if let Some(why) = selection.hints_ignored {
            out.topology_notes.push(TopologyNote {
                namespace: view.namespace.to_owned(),
                name: view.name.to_owned(),
                why,
            });
        }
        let on_empty = match what.policy {
            TrafficPolicy::Local if selection.any_usable => EmptyAction::Drop(what.local_drop),
            TrafficPolicy::Local | TrafficPolicy::Cluster => EmptyAction::Reject,
        };
        let mut frontend = Frontend {
            service: ServicePortRef {
                namespace: Arc::clone(&self.namespace),
                name: Arc::clone(&self.name),
                port_name: Arc::clone(&self.port_names[pos]),
            },
            kind: what.kind,
            source_ranges: what.source_ranges.to_vec(),
            affinity_timeout: view.affinity_timeout,
            local_only: what.policy == TrafficPolicy::Local,
            backends: selection.backends,
            kept_backends: selection.kept_backends,
            unready_backends: selection.unready_backends,
            on_empty,
        };
        frontend.shrink_to_fit();
        out.claims.push(Claim {
            key: FrontendKey {
                addr,
                port: number,
                proto: port.proto,
                scope: what.scope,
            },
            // Shared with the desired state: one copy per frontend (a Service's output is kept
            // for as long as the Service exists).
            frontend: Arc::new(frontend),
            field: what.field,
            port_index: port.index,
        });
    }
}

/// How to claim one frontend of a Service port.
struct ClaimWhat<'r> {
    scope: Scope,
    kind: FrontendKind,
    policy: TrafficPolicy,
    /// Why new connections are dropped when the policy is Local and only remote endpoints
    /// exist.
    local_drop: DropReason,
    source_ranges: &'r [IpNet],
    field: ClaimField,
}

/// Groups objects by namespace/name (sorted), keeping one of each group when all its members
/// are identical and reporting an error and keeping none when they differ.
///
/// With a live API server names are unique; with the file source the same object may be in
/// two files. Rejecting differing copies keeps the result independent of the input order.
fn unique_objects<'a, T: PartialEq>(
    kind: &'static str,
    objects: &'a [T],
    meta: impl Fn(&'a T) -> (Option<&'a str>, Option<&'a str>),
    errors: &mut Vec<ObjectError>,
) -> Vec<&'a T> {
    let named = sorted_by_name(objects, meta);
    let mut unique = Vec::with_capacity(named.len());
    for group in named.chunk_by(|a, b| (a.0, a.1) == (b.0, b.1)) {
        let (namespace, name, _) = group[0];
        match kept_copies(kind, namespace, name, group, |g| g.2) {
            Ok(kept) => unique.extend(group[..kept].iter().map(|g| g.2)),
            Err(error) => errors.push(error),
        }
    }
    unique
}

/// `objects` as (namespace, name, object), sorted by namespace/name; stable, so copies keep
/// their input order. One allocation, no tree: runs of equal names are the copies of one
/// object.
fn sorted_by_name<'a, T>(
    objects: &'a [T],
    meta: impl Fn(&'a T) -> (Option<&'a str>, Option<&'a str>),
) -> Vec<(&'a str, &'a str, &'a T)> {
    let mut named: Vec<(&str, &str, &T)> = objects
        .iter()
        .map(|object| {
            let (namespace, name) = meta(object);
            (namespace_of(namespace), name.unwrap_or_default(), object)
        })
        .collect();
    named.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    named
}

/// The rule for the `copies` of one object name (same kind, namespace and name, in input
/// order): how many of them, from the first, are used, or the error when they differ.
///
/// A named object's identical copies merge into the first; differing copies are all ignored
/// with an error. Nameless objects are not duplicates of each other: all are kept (and each
/// is reported by its parser).
fn kept_copies<C, T: PartialEq + ?Sized>(
    kind: &'static str,
    namespace: &str,
    name: &str,
    copies: &[C],
    object: impl Fn(&C) -> &T,
) -> Result<usize, ObjectError> {
    let Some(first) = copies.first() else {
        return Ok(0);
    };
    if name.is_empty() {
        return Ok(copies.len());
    }
    // Compared from the second on: comparing an object with itself is a deep walk.
    let first = object(first);
    if copies[1..].iter().all(|other| object(other) == first) {
        return Ok(1);
    }
    Err(ObjectError {
        kind,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        field: "metadata.name".to_owned(),
        reason: format!(
            "{} objects have this name and they differ; all are ignored",
            copies.len()
        ),
    })
}

/// The Service a slice belongs to, as (namespace, name): the one its `kubernetes.io/service-name`
/// label names, in the slice's namespace. `None` without the label: the slice is not for a
/// proxy.
fn slice_owner(slice: &Slice) -> Option<(&str, &str)> {
    let service = slice.service_name.as_ref()?;
    Some((namespace_of(slice.namespace.as_deref()), service))
}

/// The namespace an object lives in (`default` when it names none, like `kubectl apply`).
fn namespace_of(namespace: Option<&str>) -> &str {
    namespace.unwrap_or(DEFAULT_NAMESPACE)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
pub(crate) mod test_support {
    //! Building objects from YAML in `kubectl get -o yaml` shape.

    use serde::de::DeserializeOwned;

    /// Parses one YAML document, panicking with the error (tests only).
    pub(crate) fn yaml<T: DeserializeOwned>(text: &str) -> T {
        match serde_saphyr::from_str(text) {
            Ok(value) => value,
            Err(e) => panic!("test YAML does not parse: {e}\n{text}"),
        }
    }
}
