//! Services over Pods: the `EndpointSlice`s the Kubernetes `EndpointSlice` controller would
//! write for Services with a `selector`, computed from `v1` Pods (standalone mode only).
//!
//! In a cluster the API server's controller writes the slices and the agent reads them; this
//! module never runs there. With `run --from-dir` there is no controller, so
//! [`slices_from_pods`] plays its part, following its rules (`pkg/controller/endpointslice`
//! and `staging/src/k8s.io/endpointslice`, Kubernetes 1.33):
//! - a Service takes part when it has a non-empty `spec.selector` and is not `ExternalName`
//!   (an empty selector is no selector: the API server stores `{}` as nothing);
//! - its Pods are those in its namespace whose labels hold every `key: value` of the selector;
//! - a Pod is left out when it has no IP (`status.podIP` and `status.podIPs` empty) or is in
//!   a terminal phase (`Succeeded`, `Failed`); a Pod with a `deletionTimestamp` stays, as
//!   `terminating`;
//! - conditions: `serving` = the Pod's `Ready` condition is `True`, `terminating` =
//!   `deletionTimestamp` is set, `ready` = `serving && !terminating`, or always `true` with
//!   `publishNotReadyAddresses`;
//! - one slice set per IP family of the Service (`spec.ipFamilies`, else the family of
//!   `spec.clusterIP`, else both); a Pod's address of that family comes from
//!   `status.podIPs` (`status.podIP` when the list is empty); a Pod without one is not in
//!   that family's slices;
//! - each Service port's `targetPort` is resolved per Pod: a number is used as is, a name is
//!   looked up in the Pod's containers' `ports[]` (then in its restartable init containers,
//!   the sidecars) by name **and** protocol; a Pod that cannot resolve a port is left out of
//!   that port. Pods resolving to the same port list share a port group; each group is its
//!   own slices (at most 100 endpoints each, the controller's default);
//! - each endpoint carries `nodeName`, `targetRef` (kind `Pod`, namespace, name, uid) and
//!   `zone`: the `topology.kubernetes.io/zone` label of the Pod's Node, when the directory
//!   holds that Node and the label is not empty (`podToEndpoint`);
//! - hints (`trafficdist.ReconcileHints`): with `spec.trafficDistribution` `PreferClose` or
//!   `PreferSameZone`, every **ready** endpoint with a `zone` gets `hints.forZones: [zone]`;
//!   with `PreferSameNode` also `hints.forNodes: [nodeName]` (when it has a node). Endpoints
//!   that are not ready, or have neither, get no hints; any other value (or none) gives no
//!   hints. The controller judges each endpoint alone: a Service whose Pods are partly on
//!   zoneless Nodes gets hints on the others, and kube-proxy then ignores the hints (an
//!   endpoint misses them). The `service.kubernetes.io/topology-mode: Auto` annotation (the
//!   older proportional heuristic, which needs every Node's allocatable CPU) takes precedence
//!   in the controller over `trafficDistribution`; it is not implemented here: such a Service
//!   gets no hints.
//!
//! Deliberate differences, because a directory is not a cluster: the controller leaves out a
//! Pod whose `spec.nodeName` names a Node it does not know; here Nodes are optional (the
//! directory often lists only this node), so the Pod is kept, without a `zone`. Slices get
//! fixed names (`<service>-pods-<family>-<n>`) instead of generated ones. Hand-written slices
//! naming a Service that has a selector are ignored, and each is reported in
//! [`PodSlices::ignored_slices`].
//!
//! A bad Pod (an address that does not parse, two addresses of one family, a container port
//! out of range) is skipped as a whole and reported in [`PodSlices::errors`] with the field;
//! so is a bad `targetPort` of a Service (that port is skipped). Nothing here panics.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fmt,
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::{
    api::{
        core::v1::{Container, Node, ObjectReference, Pod},
        discovery::v1::{
            Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice, ForNode,
            ForZone,
        },
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

use super::{
    LABEL_SERVICE_NAME, LABEL_TOPOLOGY_ZONE, ObjectError, Protocol, Slice, Svc, SvcSpec,
    kept_copies, lean_slices, namespace_of, slice_owner, unique_objects,
};

/// The annotation selecting the older topology-aware hints heuristic (`Auto`); with it, the
/// controller ignores `trafficDistribution`.
pub(crate) const ANNOTATION_TOPOLOGY_MODE: &str = "service.kubernetes.io/topology-mode";
/// The deprecated name of [`ANNOTATION_TOPOLOGY_MODE`] (it wins when both are set).
pub(crate) const ANNOTATION_TOPOLOGY_AWARE_HINTS: &str =
    "service.kubernetes.io/topology-aware-hints";

/// The label the controller puts on the slices it manages; ours say who wrote them.
pub const LABEL_MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
/// The value of [`LABEL_MANAGED_BY`] on the slices computed here.
pub const MANAGED_BY: &str = "svc-agent.standalone";
/// The most endpoints one computed slice holds (the controller's `--max-endpoints-per-slice`
/// default).
pub const MAX_ENDPOINTS_PER_SLICE: usize = 100;

/// What [`slices_from_pods`] found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodSlices {
    /// The slices to compute the desired state from: the hand-written ones of Services
    /// without a selector, then the computed ones (sorted by namespace, Service, family).
    pub slices: Vec<Arc<Slice>>,
    /// The computed slices as the API would hold them (the `EndpointSlice` controller's
    /// objects, for display), in the order of [`slices`](Self::slices).
    pub computed: Vec<Arc<EndpointSlice>>,
    /// One entry per Service with a selector, sorted by namespace and name.
    pub selections: Vec<Selection>,
    /// Hand-written slices ignored because their Service has a selector.
    pub ignored_slices: Vec<IgnoredSlice>,
    /// Bad Pods (skipped) and bad `targetPort`s (that port skipped).
    pub errors: Vec<ObjectError>,
}

/// The Pods a Service's selector chose.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub name: String,
    /// The selector, as `key==value` terms joined by `,` (sorted by key).
    pub selector: String,
    /// The names of the Pods that are endpoints (matching, with an IP, not terminal), sorted.
    pub pods: Vec<String>,
    /// How many of them are `ready`.
    pub ready: usize,
}

impl fmt::Display for Selection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.pods.len();
        let plural = if n == 1 { "" } else { "s" };
        write!(
            f,
            "{}/{} {}: {n} pod{plural} ({} ready)",
            self.namespace, self.name, self.selector, self.ready
        )
    }
}

/// A hand-written `EndpointSlice` ignored because its Service has a selector.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct IgnoredSlice {
    /// The namespace of the slice and the Service.
    pub namespace: String,
    /// The slice's name.
    pub slice: String,
    /// The Service it names.
    pub service: String,
}

impl fmt::Display for IgnoredSlice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "EndpointSlice {ns}/{slice} is ignored: Service {ns}/{svc} has a selector, its \
             endpoints are computed from Pods",
            ns = self.namespace,
            slice = self.slice,
            svc = self.service
        )
    }
}

/// An IP family of the Service's slices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn of(addr: IpAddr) -> Self {
        if addr.is_ipv6() { Self::V6 } else { Self::V4 }
    }

    fn address_type(self) -> &'static str {
        match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Self::V4 => "ipv4",
            Self::V6 => "ipv6",
        }
    }
}

/// A named container port.
#[derive(Debug)]
struct NamedPort<'a> {
    name: &'a str,
    proto: Protocol,
    port: u16,
}

/// A validated Pod.
#[derive(Debug)]
struct PodView<'a> {
    pod: &'a Pod,
    namespace: &'a str,
    name: &'a str,
    /// At most one address per family.
    addrs: Vec<IpAddr>,
    /// Containers first, then restartable init containers, in order.
    named_ports: Vec<NamedPort<'a>>,
    serving: bool,
    terminating: bool,
    terminal: bool,
}

impl PodView<'_> {
    fn labels(&self) -> Option<&BTreeMap<String, String>> {
        self.pod.metadata.labels.as_ref()
    }

    fn addr(&self, family: Family) -> Option<IpAddr> {
        self.addrs
            .iter()
            .copied()
            .find(|a| Family::of(*a) == family)
    }

    /// `FindPort`: the container port named `name` with protocol `proto`.
    fn find_port(&self, name: &str, proto: Protocol) -> Option<u16> {
        self.named_ports
            .iter()
            .find(|p| p.name == name && p.proto == proto)
            .map(|p| p.port)
    }
}

/// A Service port's target.
#[derive(Debug)]
enum Target<'a> {
    Number(u16),
    Name(&'a str),
}

/// A Service port, as the controller reads it.
#[derive(Debug)]
struct TargetPort<'a> {
    name: &'a str,
    proto: Protocol,
    target: Target<'a>,
}

/// Which hints the controller puts on a Service's ready endpoints (`spec.trafficDistribution`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HintPolicy {
    /// None (no or an unknown `trafficDistribution`, or the `Auto` annotation).
    None,
    /// `forZones` (`PreferClose`, `PreferSameZone`).
    Zone,
    /// `forZones` and `forNodes` (`PreferSameNode`).
    ZoneAndNode,
}

/// A Service taking part: it has a selector.
#[derive(Debug)]
struct SelectorService<'a> {
    namespace: &'a str,
    name: &'a str,
    selector: &'a BTreeMap<String, String>,
    publish_not_ready: bool,
    families: Vec<Family>,
    ports: Vec<TargetPort<'a>>,
    hints: HintPolicy,
}

/// Computes the `EndpointSlice`s of every Service with a selector from `pods` (with the zones
/// of their `nodes`), and returns them with the hand-written `slices` of the other Services
/// (see the module documentation for the rules). The result does not depend on the order of
/// the inputs.
#[must_use]
pub fn slices_from_pods(
    services: &[Arc<Svc>],
    pods: &[Arc<Pod>],
    slices: &[Arc<Slice>],
    nodes: &[Arc<Node>],
) -> PodSlices {
    let mut out = PodSlices::default();
    let services = unique_objects(
        "Service",
        services,
        |s| (s.metadata.namespace.as_deref(), s.metadata.name.as_deref()),
        &mut Vec::new(), // `compute` reports duplicate Services itself.
    );
    let pods = unique_objects(
        "Pod",
        pods,
        |p| (p.metadata.namespace.as_deref(), p.metadata.name.as_deref()),
        &mut out.errors,
    );
    let selector_services: Vec<SelectorService<'_>> = services
        .iter()
        .filter_map(|svc| selector_service(svc, &mut out.errors))
        .collect();
    let pods: Vec<PodView<'_>> = pods
        .into_iter()
        .filter_map(|pod| parse_pod(pod, &mut out.errors))
        .collect();
    let zones = node_zones(nodes);
    let mut by_namespace: BTreeMap<&str, Vec<&PodView<'_>>> = BTreeMap::new();
    for pod in &pods {
        by_namespace.entry(pod.namespace).or_default().push(pod);
    }

    let selected: BTreeSet<(&str, &str)> = selector_services
        .iter()
        .map(|s| (s.namespace, s.name))
        .collect();
    for slice in slices {
        match slice_owner(slice) {
            Some((namespace, service)) if selected.contains(&(namespace, service)) => {
                out.ignored_slices.push(IgnoredSlice {
                    namespace: namespace.to_owned(),
                    slice: slice.name.clone().unwrap_or_default(),
                    service: service.to_owned(),
                });
            }
            _ => out.slices.push(Arc::clone(slice)),
        }
    }
    out.ignored_slices.sort();

    for svc in &selector_services {
        let candidates = by_namespace
            .get(svc.namespace)
            .map_or(&[][..], Vec::as_slice);
        let selection = select(svc, candidates, &zones, &mut out.computed);
        out.selections.push(selection);
    }
    out.slices.extend(lean_slices(&out.computed));
    out.errors.sort();
    out.errors.dedup();
    out
}

/// One selector Service's part: the Pods of `candidates` (its namespace's, sorted by name)
/// it selects, and their slices (appended to `slices`).
fn select(
    svc: &SelectorService<'_>,
    candidates: &[&PodView<'_>],
    zones: &BTreeMap<&str, &str>,
    slices: &mut Vec<Arc<EndpointSlice>>,
) -> Selection {
    let matching: Vec<&PodView<'_>> = candidates
        .iter()
        .copied()
        .filter(|pod| selects(svc.selector, pod.labels()))
        .filter(|pod| !pod.addrs.is_empty() && !pod.terminal)
        .collect();
    for &family in &svc.families {
        service_slices(svc, family, &matching, zones, slices);
    }
    Selection {
        namespace: svc.namespace.to_owned(),
        name: svc.name.to_owned(),
        selector: selector_string(svc.selector),
        pods: matching.iter().map(|p| p.name.to_owned()).collect(),
        ready: matching.iter().filter(|p| svc.ready(p)).count(),
    }
}

impl SelectorService<'_> {
    fn ready(&self, pod: &PodView<'_>) -> bool {
        self.publish_not_ready || (pod.serving && !pod.terminating)
    }
}

/// Whether `labels` hold every term of `selector` (a non-empty equality selector).
fn selects(selector: &BTreeMap<String, String>, labels: Option<&BTreeMap<String, String>>) -> bool {
    selector
        .iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

fn selector_string(selector: &BTreeMap<String, String>) -> String {
    selector
        .iter()
        .map(|(k, v)| format!("{k}=={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The slices of one Service and family: one port group per distinct resolved port list,
/// split in chunks of [`MAX_ENDPOINTS_PER_SLICE`].
fn service_slices(
    svc: &SelectorService<'_>,
    family: Family,
    pods: &[&PodView<'_>],
    zones: &BTreeMap<&str, &str>,
    slices: &mut Vec<Arc<EndpointSlice>>,
) {
    // Resolved ports (name, protocol, number), in the Service's order -> endpoints.
    let mut groups: BTreeMap<Vec<(&str, Protocol, u16)>, Vec<Endpoint>> = BTreeMap::new();
    for pod in pods {
        let Some(addr) = pod.addr(family) else {
            continue;
        };
        let ports: Vec<(&str, Protocol, u16)> = svc
            .ports
            .iter()
            .filter_map(|p| {
                let number = match p.target {
                    Target::Number(n) => Some(n),
                    Target::Name(name) => pod.find_port(name, p.proto),
                }?;
                Some((p.name, p.proto, number))
            })
            .collect();
        groups
            .entry(ports)
            .or_default()
            .push(endpoint(svc, pod, addr, zones));
    }
    let mut index = 0;
    for (ports, endpoints) in groups {
        for chunk in endpoints.chunks(MAX_ENDPOINTS_PER_SLICE) {
            slices.push(Arc::new(EndpointSlice {
                metadata: ObjectMeta {
                    name: Some(format!("{}-pods-{}-{index}", svc.name, family.slug())),
                    namespace: Some(svc.namespace.to_owned()),
                    labels: Some(BTreeMap::from([
                        (LABEL_SERVICE_NAME.to_owned(), svc.name.to_owned()),
                        (LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned()),
                    ])),
                    ..ObjectMeta::default()
                },
                address_type: family.address_type().to_owned(),
                endpoints: chunk.to_vec(),
                ports: Some(
                    ports
                        .iter()
                        .map(|&(name, proto, port)| EndpointPort {
                            name: Some(name.to_owned()),
                            protocol: Some(proto.as_k8s().to_owned()),
                            port: Some(i32::from(port)),
                            app_protocol: None,
                        })
                        .collect(),
                ),
            }));
            index += 1;
        }
    }
}

/// The zone of every Node with a non-empty `topology.kubernetes.io/zone` label, by name.
/// Differing Node objects of one name give that name no zone (the model reports them).
fn node_zones(nodes: &[Arc<Node>]) -> BTreeMap<&str, &str> {
    let mut zones: BTreeMap<&str, Option<&str>> = BTreeMap::new();
    for node in nodes {
        let Some(name) = node.metadata.name.as_deref() else {
            continue;
        };
        let zone = node
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_TOPOLOGY_ZONE))
            .map(String::as_str)
            .filter(|z| !z.is_empty());
        zones
            .entry(name)
            .and_modify(|seen| {
                if *seen != zone {
                    *seen = None;
                }
            })
            .or_insert(zone);
    }
    zones
        .into_iter()
        .filter_map(|(name, zone)| Some((name, zone?)))
        .collect()
}

/// `podToEndpoint`, with the hints of `trafficdist` (`preferCloseHeuristic.update`).
fn endpoint(
    svc: &SelectorService<'_>,
    pod: &PodView<'_>,
    addr: IpAddr,
    zones: &BTreeMap<&str, &str>,
) -> Endpoint {
    let meta = &pod.pod.metadata;
    let node_name = pod
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .filter(|n| !n.is_empty());
    let zone = node_name
        .as_deref()
        .and_then(|n| zones.get(n))
        .map(|z| (*z).to_owned());
    let ready = svc.ready(pod);
    let hints = if ready && svc.hints != HintPolicy::None {
        let for_zones = zone.clone().map(|name| vec![ForZone { name }]);
        let for_nodes = node_name
            .clone()
            .filter(|_| svc.hints == HintPolicy::ZoneAndNode)
            .map(|name| vec![ForNode { name }]);
        (for_zones.is_some() || for_nodes.is_some()).then_some(EndpointHints {
            for_nodes,
            for_zones,
        })
    } else {
        None
    };
    Endpoint {
        addresses: vec![addr.to_string()],
        conditions: Some(EndpointConditions {
            ready: Some(ready),
            serving: Some(pod.serving),
            terminating: Some(pod.terminating),
        }),
        node_name,
        zone,
        hints,
        target_ref: Some(ObjectReference {
            kind: Some("Pod".to_owned()),
            namespace: Some(pod.namespace.to_owned()),
            name: Some(pod.name.to_owned()),
            uid: meta.uid.clone(),
            ..ObjectReference::default()
        }),
        ..Endpoint::default()
    }
}

/// The Service's part in the controller's work, or `None` when it has none (no selector,
/// `ExternalName`, no name). A bad `targetPort` is reported and that port skipped; other bad
/// fields are `compute`'s to report.
fn selector_service<'a>(
    svc: &'a Svc,
    errors: &mut Vec<ObjectError>,
) -> Option<SelectorService<'a>> {
    let spec = svc.spec.as_ref()?;
    let selector = spec.selector.as_ref().filter(|s| !s.is_empty())?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let name = svc.metadata.name.as_deref().filter(|n| !n.is_empty())?;
    let namespace = namespace_of(svc.metadata.namespace.as_deref());
    let mut ports = Vec::new();
    for (i, port) in spec.ports.iter().flatten().enumerate() {
        // An unknown protocol or a bad port number is reported by `compute`.
        let Some(proto) = Protocol::from_k8s(port.protocol.as_deref().unwrap_or("TCP")) else {
            continue;
        };
        let target = match &port.target_port {
            // The API server defaults an unset (or zero, or empty) targetPort to the port.
            None | Some(IntOrString::Int(0)) => u16::try_from(port.port).ok().map(Target::Number),
            Some(IntOrString::String(s)) if s.is_empty() => {
                u16::try_from(port.port).ok().map(Target::Number)
            }
            Some(IntOrString::Int(n)) => {
                let number = u16::try_from(*n).ok().filter(|&n| n != 0);
                if number.is_none() {
                    errors.push(ObjectError {
                        kind: "Service",
                        namespace: namespace.to_owned(),
                        name: name.to_owned(),
                        field: format!("spec.ports[{i}].targetPort"),
                        reason: format!("{n} is not in 1..=65535"),
                    });
                }
                number.map(Target::Number)
            }
            Some(IntOrString::String(s)) => Some(Target::Name(s)),
        };
        if let Some(target) = target {
            ports.push(TargetPort {
                name: port.name.as_deref().unwrap_or_default(),
                proto,
                target,
            });
        }
    }
    let families = service_families(spec);
    Some(SelectorService {
        namespace,
        name,
        selector,
        publish_not_ready: spec.publish_not_ready_addresses.unwrap_or(false),
        families,
        ports,
        hints: hint_policy(svc),
    })
}

/// The hints the controller gives `svc`'s endpoints: by `spec.trafficDistribution`, unless
/// the topology annotation asks for `Auto` (`hintsEnabled`), which is not implemented here.
fn hint_policy(svc: &Svc) -> HintPolicy {
    let annotations = svc.metadata.annotations.as_ref();
    let mode = annotations.and_then(|a| {
        a.get(ANNOTATION_TOPOLOGY_AWARE_HINTS)
            .or_else(|| a.get(ANNOTATION_TOPOLOGY_MODE))
    });
    if matches!(mode.map(String::as_str), Some("Auto" | "auto")) {
        return HintPolicy::None;
    }
    let spec = svc.spec.as_ref();
    match spec.and_then(|s| s.traffic_distribution.as_deref()) {
        Some("PreferClose" | "PreferSameZone") => HintPolicy::Zone,
        Some("PreferSameNode") => HintPolicy::ZoneAndNode,
        _ => HintPolicy::None,
    }
}

/// `getAddressTypesForService`: `spec.ipFamilies`, else the family of `spec.clusterIP`,
/// else both.
fn service_families(spec: &SvcSpec) -> Vec<Family> {
    let mut families: Vec<Family> = spec
        .ip_families
        .iter()
        .flatten()
        .filter_map(|f| match &**f {
            "IPv4" => Some(Family::V4),
            "IPv6" => Some(Family::V6),
            _ => None,
        })
        .collect();
    if families.is_empty() {
        let cluster_ip = spec
            .cluster_ip
            .as_deref()
            .filter(|ip| !ip.is_empty() && *ip != "None");
        families = match cluster_ip.map(str::parse::<IpAddr>) {
            Some(Ok(addr)) => vec![Family::of(addr)],
            // A bad address is `compute`'s to report; no slices for it.
            Some(Err(_)) => Vec::new(),
            None => vec![Family::V4, Family::V6],
        };
    }
    families.sort();
    families.dedup();
    families
}

/// Validates one Pod; `None` (with one error per bad field) when it cannot be used.
fn parse_pod<'a>(pod: &'a Pod, errors: &mut Vec<ObjectError>) -> Option<PodView<'a>> {
    let namespace = namespace_of(pod.metadata.namespace.as_deref());
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let mut failed = false;
    let mut fail = |field: String, reason: String| {
        failed = true;
        errors.push(ObjectError {
            kind: "Pod",
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            field,
            reason,
        });
    };
    if name.is_empty() {
        fail("metadata.name".to_owned(), "missing".to_owned());
    }
    let status = pod.status.as_ref();
    let pod_ip = status
        .and_then(|s| s.pod_ip.as_deref())
        .filter(|ip| !ip.is_empty());
    let pod_ips = status
        .and_then(|s| s.pod_ips.as_deref())
        .unwrap_or_default();

    let mut addrs: Vec<IpAddr> = Vec::new();
    let mut add = |field: String, text: &str, fail: &mut dyn FnMut(String, String)| match text
        .parse::<IpAddr>()
    {
        Ok(addr) if addrs.iter().any(|a| Family::of(*a) == Family::of(addr)) => fail(
            field,
            format!("{text:?}: a Pod has at most one address per IP family"),
        ),
        Ok(addr) => addrs.push(addr),
        Err(_) => fail(field, format!("{text:?} is not an IP address")),
    };
    if pod_ips.is_empty() {
        if let Some(ip) = pod_ip {
            add("status.podIP".to_owned(), ip, &mut fail);
        }
    } else {
        for (i, ip) in pod_ips.iter().enumerate() {
            add(format!("status.podIPs[{i}].ip"), &ip.ip, &mut fail);
        }
        if let Some(ip) = pod_ip
            && pod_ips[0].ip != ip
        {
            fail(
                "status.podIPs[0].ip".to_owned(),
                format!("{:?} differs from status.podIP {ip:?}", pod_ips[0].ip),
            );
        }
    }

    let mut named_ports = Vec::new();
    if let Some(spec) = &pod.spec {
        let sidecars = spec
            .init_containers
            .iter()
            .flatten()
            .enumerate()
            .filter(|(_, c)| c.restart_policy.as_deref() == Some("Always"))
            .map(|(i, c)| (format!("spec.initContainers[{i}]"), c));
        let containers = spec
            .containers
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("spec.containers[{i}]"), c));
        for (field, container) in containers.chain(sidecars) {
            container_ports(&field, container, &mut named_ports, &mut fail);
        }
    }

    let status_of = |kind: &str| {
        status
            .and_then(|s| s.conditions.as_deref())
            .unwrap_or_default()
            .iter()
            .find(|c| c.type_ == kind)
            .map(|c| c.status.as_str())
    };
    let serving = status_of("Ready") == Some("True");
    let phase = status.and_then(|s| s.phase.as_deref());
    (!failed).then(|| PodView {
        pod,
        namespace,
        name,
        addrs,
        named_ports,
        serving,
        terminating: pod.metadata.deletion_timestamp.is_some(),
        terminal: matches!(phase, Some("Succeeded" | "Failed")),
    })
}

/// Validates a container's ports, keeping the named ones.
fn container_ports<'a>(
    field: &str,
    container: &'a Container,
    named: &mut Vec<NamedPort<'a>>,
    fail: &mut dyn FnMut(String, String),
) {
    for (i, port) in container.ports.iter().flatten().enumerate() {
        let proto_text = port.protocol.as_deref().unwrap_or("TCP");
        let proto = Protocol::from_k8s(proto_text);
        if proto.is_none() {
            fail(
                format!("{field}.ports[{i}].protocol"),
                format!("unknown protocol {proto_text:?} (expected TCP, UDP or SCTP)"),
            );
        }
        let number = u16::try_from(port.container_port).ok().filter(|&n| n != 0);
        if number.is_none() {
            fail(
                format!("{field}.ports[{i}].containerPort"),
                format!("{} is not in 1..=65535", port.container_port),
            );
        }
        if let (Some(name), Some(proto), Some(port)) = (
            port.name.as_deref().filter(|n| !n.is_empty()),
            proto,
            number,
        ) {
            named.push(NamedPort { name, proto, port });
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The same computation, kept up to date object by object
// ---------------------------------------------------------------------------------------------

/// A namespace and a name.
type Key = (String, String);

fn key_of(namespace: &str, name: &str) -> Key {
    (namespace.to_owned(), name.to_owned())
}

/// What a [`PodSlicer::update`] changed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodSliceChanges {
    /// The `EndpointSlice` names (namespace, name) whose copies for the model may have
    /// changed: each one's [`PodSlicer::slice_copies`] is to be handed to the model.
    pub slices: BTreeSet<(String, String)>,
    /// The selections of the selector Services computed again, sorted by namespace and name.
    pub selections: Vec<Selection>,
    /// The Services (namespace, name) that no longer have a selection.
    pub unselected: Vec<(String, String)>,
}

/// One selector Service's part, as last computed.
#[derive(Debug)]
struct Computed {
    selection: Selection,
    /// The names of its slices (the slices are in [`PodSlicer::computed_slices`]).
    slices: Vec<Key>,
    /// Its bad `targetPort`s.
    errors: Vec<ObjectError>,
}

/// The hand-written `EndpointSlice`s a [`PodSlicer`] reads: the source holds them, the slicer
/// keeps none.
pub trait HandWrittenSlices {
    /// Every copy of the slice `namespace/name`, in the source's order.
    fn copies(&self, namespace: &str, name: &str) -> Vec<Arc<Slice>>;
    /// Every slice, the copies of one name together in the source's order.
    fn all(&self) -> Vec<Arc<Slice>>;
}

/// Sets `namespace/name` in a map of objects by namespace and name to `now` (none: removed;
/// a namespace left empty goes).
fn put_by_namespace<T>(
    map: &mut HashMap<String, BTreeMap<String, Arc<T>>>,
    namespace: &str,
    name: &str,
    now: Option<&Arc<T>>,
) {
    match now {
        Some(object) => {
            map.entry(namespace.to_owned())
                .or_default()
                .insert(name.to_owned(), Arc::clone(object));
        }
        None => {
            if let Some(objects) = map.get_mut(namespace) {
                objects.remove(name);
                if objects.is_empty() {
                    map.remove(namespace);
                }
            }
        }
    }
}

/// [`slices_from_pods`] kept up to date as objects change (the standalone source's passes).
///
/// Each `set_*` call gives every copy of one name, in the source's order (the model's rule
/// for copies applies: identical copies are one object, differing ones are none); the
/// hand-written slices stay in the source ([`HandWrittenSlices`]), which says which changed
/// ([`slice_changed`](Self::slice_changed)). [`update`](Self::update) then recomputes the slices of only the selector Services whose
/// Service changed, that a changed Pod matches before or after its change, or (a Node's zone
/// changed) all of them, and names the slices whose copies for the model may have changed:
/// the hand-written ones that changed or whose Service gained or lost its selector, and the
/// computed ones of the Services computed again. What it holds equals [`slices_from_pods`]
/// of the same objects: [`slices`](Self::slices), [`errors`](Self::errors),
/// [`ignored_slices`](Self::ignored_slices) and the selections (tested against it).
#[derive(Debug, Default)]
pub struct PodSlicer {
    /// The Services with a selector (the used copy of their name), by namespace, then name.
    selectors: HashMap<String, BTreeMap<String, Arc<Svc>>>,
    /// The usable Pods (the used copy of their name, valid), by namespace, then name.
    pods: HashMap<String, BTreeMap<String, Arc<Pod>>>,
    /// The errors of each Pod name (differing copies, bad fields).
    pod_errors: HashMap<Key, Vec<ObjectError>>,
    /// The Services that gained or lost their selector since the last update, by namespace
    /// (their hand-written slices change sides: the update looks for them).
    flipped: HashMap<String, HashSet<String>>,
    nodes: Vec<Arc<Node>>,
    /// Each selector Service's part.
    computed: HashMap<Key, Computed>,
    /// The computed slices by name (two Services never compute the same name: a name ends
    /// in `-pods-<family>-<n>` after its Service's).
    computed_slices: HashMap<Key, Arc<Slice>>,
    /// The hand-written slices ignored, by slice name.
    ignored: BTreeMap<Key, Vec<IgnoredSlice>>,
    /// Every error, sorted and deduplicated (rebuilt by an update when a part changed).
    errors: Vec<ObjectError>,
    errors_dirty: bool,
    /// The selector Services the next update computes again.
    recompute: BTreeSet<Key>,
    /// The slice names whose copies may have changed since the last update.
    dirty_slices: BTreeSet<Key>,
}

impl PodSlicer {
    /// An empty computation (no objects).
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The Service `namespace/name` is now `copies` (none: deleted).
    pub fn set_service(&mut self, namespace: &str, name: &str, copies: &[Arc<Svc>]) {
        let kept = match kept_copies("Service", namespace, name, copies, |c| &**c) {
            Ok(n) => &copies[..n],
            Err(_) => &[],
        };
        // Nameless Services are never selector Services.
        let now = kept
            .first()
            .filter(|svc| selector_service(svc, &mut Vec::new()).is_some());
        let before = self.selectors.get(namespace).and_then(|s| s.get(name));
        match (before, now) {
            (None, None) => return,
            (Some(a), Some(b)) if Arc::ptr_eq(a, b) || a == b => return,
            _ => {}
        }
        let key = key_of(namespace, name);
        if before.is_some() != now.is_some() {
            // Its hand-written slices change sides (used or ignored).
            (self.flipped.entry(namespace.to_owned()).or_default()).insert(name.to_owned());
        }
        put_by_namespace(&mut self.selectors, namespace, name, now);
        self.recompute.insert(key);
    }

    /// The Pod `namespace/name` is now `copies` (none: deleted).
    pub fn set_pod(&mut self, namespace: &str, name: &str, copies: &[Arc<Pod>]) {
        let mut errors = Vec::new();
        let kept = match kept_copies("Pod", namespace, name, copies, |c| &**c) {
            Ok(n) => &copies[..n],
            Err(e) => {
                errors.push(e);
                &[]
            }
        };
        let mut now = None;
        for pod in kept {
            if parse_pod(pod, &mut errors).is_some() {
                now = Some(pod);
            }
        }
        let key = key_of(namespace, name);
        let errors_before = if errors.is_empty() {
            self.pod_errors.remove(&key)
        } else {
            self.pod_errors.insert(key.clone(), errors.clone())
        };
        if errors_before.unwrap_or_default() != errors {
            self.errors_dirty = true;
        }

        let before = self.pods.get(namespace).and_then(|p| p.get(name));
        match (before, now) {
            (None, None) => return,
            (Some(a), Some(b)) if Arc::ptr_eq(a, b) || a == b => return,
            _ => {}
        }
        // The selector Services it took part in, or takes part in now.
        let labels = [before, now].map(|p| p.and_then(|p| p.metadata.labels.as_ref()));
        for (service, svc) in self.selectors.get(namespace).into_iter().flatten() {
            let selector = svc.spec.as_ref().and_then(|s| s.selector.as_ref());
            if let Some(selector) = selector
                && labels.iter().any(|l| selects(selector, *l))
            {
                self.recompute.insert(key_of(namespace, service));
            }
        }
        put_by_namespace(&mut self.pods, namespace, name, now);
    }

    /// The hand-written `EndpointSlice` `namespace/name` changed (added, edited or removed).
    pub fn slice_changed(&mut self, namespace: &str, name: &str) {
        self.dirty_slices.insert(key_of(namespace, name));
    }

    /// The Nodes are now `nodes` (their zones go into the endpoints).
    pub fn set_nodes(&mut self, nodes: Vec<Arc<Node>>) {
        if node_zones(&self.nodes) != node_zones(&nodes) {
            for (namespace, services) in &self.selectors {
                (self.recompute).extend(services.keys().map(|name| key_of(namespace, name)));
            }
        }
        self.nodes = nodes;
    }

    /// Computes again what the changes since the last update touch (`hand_written`: the
    /// slices as they are now); says which slices the model is to be handed again and which
    /// selections changed.
    pub fn update(&mut self, hand_written: &impl HandWrittenSlices) -> PodSliceChanges {
        let mut changes = PodSliceChanges::default();
        let flipped = std::mem::take(&mut self.flipped);
        if !flipped.is_empty() {
            // Rare (a Service gains or loses its selector): one walk over the slices.
            for slice in hand_written.all() {
                let Some((namespace, service)) = slice_owner(&slice) else {
                    continue;
                };
                if flipped.get(namespace).is_some_and(|s| s.contains(service)) {
                    let name = slice.name.as_deref().unwrap_or_default();
                    self.dirty_slices.insert(key_of(namespace, name));
                }
            }
        }
        let recompute = std::mem::take(&mut self.recompute);
        let zones_of = self.nodes.clone();
        let zones = node_zones(&zones_of);
        for service in recompute {
            if let Some(old) = self.computed.remove(&service) {
                for name in old.slices {
                    self.computed_slices.remove(&name);
                    self.dirty_slices.insert(name);
                }
                if !old.errors.is_empty() {
                    self.errors_dirty = true;
                }
            }
            let (namespace, name) = (&service.0, &service.1);
            let svc = self
                .selectors
                .get(namespace)
                .and_then(|s| s.get(name))
                .cloned();
            let mut errors = Vec::new();
            let Some(selector) = svc
                .as_deref()
                .and_then(|svc| selector_service(svc, &mut errors))
            else {
                changes.unselected.push(service);
                continue;
            };
            // Only the Pods it selects are parsed again (all of them are valid).
            let pods: Vec<&Arc<Pod>> = (self.pods.get(namespace).into_iter().flatten())
                .map(|(_, pod)| pod)
                .filter(|pod| selects(selector.selector, pod.metadata.labels.as_ref()))
                .collect();
            let views: Vec<PodView<'_>> = (pods.iter())
                .filter_map(|pod| parse_pod(pod, &mut Vec::new()))
                .collect();
            let views: Vec<&PodView<'_>> = views.iter().collect();
            let mut slices = Vec::new();
            let selection = select(&selector, &views, &zones, &mut slices);
            let mut names = Vec::with_capacity(slices.len());
            for slice in slices {
                let name = key_of(
                    namespace,
                    slice.metadata.name.as_deref().unwrap_or_default(),
                );
                self.dirty_slices.insert(name.clone());
                let slice = Arc::new(Slice::from(Arc::unwrap_or_clone(slice)));
                self.computed_slices.insert(name.clone(), slice);
                names.push(name);
            }
            self.errors_dirty |= !errors.is_empty();
            changes.selections.push(selection.clone());
            self.computed.insert(
                service,
                Computed {
                    selection,
                    slices: names,
                    errors,
                },
            );
        }
        let ignored: Vec<(Key, Vec<IgnoredSlice>)> = (self.dirty_slices.iter())
            .map(|name| (name.clone(), self.ignored_copies(name, hand_written)))
            .collect();
        for (name, ignored) in ignored {
            if ignored.is_empty() {
                self.ignored.remove(&name);
            } else {
                self.ignored.insert(name, ignored);
            }
        }
        if std::mem::take(&mut self.errors_dirty) {
            let mut errors: Vec<ObjectError> = (self.pod_errors.values().flatten())
                .chain(self.computed.values().flat_map(|c| &c.errors))
                .cloned()
                .collect();
            errors.sort();
            errors.dedup();
            self.errors = errors;
        }
        changes.slices = std::mem::take(&mut self.dirty_slices);
        changes
    }

    /// Whether the Service `namespace/name` has a selector (its hand-written slices are
    /// ignored).
    fn selects_for(&self, namespace: &str, name: &str) -> bool {
        self.selectors
            .get(namespace)
            .is_some_and(|s| s.contains_key(name))
    }

    /// The hand-written copies of `name` that are ignored (their Service has a selector).
    fn ignored_copies(
        &self,
        name: &Key,
        hand_written: &impl HandWrittenSlices,
    ) -> Vec<IgnoredSlice> {
        (hand_written.copies(&name.0, &name.1).iter())
            .filter_map(|slice| {
                let (namespace, service) = slice_owner(slice)?;
                self.selects_for(namespace, service).then(|| IgnoredSlice {
                    namespace: namespace.to_owned(),
                    slice: slice.name.clone().unwrap_or_default(),
                    service: service.to_owned(),
                })
            })
            .collect()
    }

    /// The copies of the slice `namespace/name` the model computes from: the hand-written
    /// ones (of `hand_written`) whose Service has no selector, then the computed one.
    #[must_use]
    pub fn slice_copies(
        &self,
        namespace: &str,
        name: &str,
        hand_written: &impl HandWrittenSlices,
    ) -> Vec<Arc<Slice>> {
        let mut copies = self.used(hand_written.copies(namespace, name));
        copies.extend(self.computed_slices.get(&key_of(namespace, name)).cloned());
        copies
    }

    /// Of hand-written slices, those used (their Service has no selector).
    fn used(&self, mut slices: Vec<Arc<Slice>>) -> Vec<Arc<Slice>> {
        slices
            .retain(|slice| !slice_owner(slice).is_some_and(|(ns, svc)| self.selects_for(ns, svc)));
        slices
    }

    /// Every slice the model computes from (as [`PodSlices::slices`], in another order): the
    /// used ones of `hand_written`, then the computed ones.
    #[must_use]
    pub fn slices(&self, hand_written: &impl HandWrittenSlices) -> Vec<Arc<Slice>> {
        let mut all = self.used(hand_written.all());
        all.extend(self.computed_slices.values().cloned());
        all
    }

    /// Bad Pods and bad `targetPort`s, sorted (as [`PodSlices::errors`]).
    #[must_use]
    pub fn errors(&self) -> &[ObjectError] {
        &self.errors
    }

    /// The hand-written slices ignored, sorted (as [`PodSlices::ignored_slices`]).
    #[must_use]
    pub fn ignored_slices(&self) -> Vec<IgnoredSlice> {
        let mut ignored: Vec<IgnoredSlice> = self.ignored.values().flatten().cloned().collect();
        ignored.sort();
        ignored
    }

    /// Every selection, sorted by namespace and name (as [`PodSlices::selections`]).
    #[must_use]
    pub fn selections(&self) -> Vec<Selection> {
        let mut selections: Vec<&Computed> = self.computed.values().collect();
        selections.sort_by(|a, b| {
            (&a.selection.namespace, &a.selection.name)
                .cmp(&(&b.selection.namespace, &b.selection.name))
        });
        selections
            .into_iter()
            .map(|c| c.selection.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    //! Pods × Services → slices, each row checked against the controller's documented rules.

    use std::fmt::Write as _;

    use super::*;
    use crate::model::test_support::yaml;

    fn service(text: &str) -> Arc<Svc> {
        let svc: k8s_openapi::api::core::v1::Service =
            yaml(&format!("apiVersion: v1\nkind: Service\n{text}"));
        Arc::new(svc.into())
    }

    /// A Pod `name` in `default` with labels `labels` (`k: v, ...`), address(es) `ips`
    /// (`a` or `a,b`), conditions and extra YAML under `spec`/`status`.
    fn pod(name: &str, labels: &str, ips: &str, ready: bool, extra_spec: &str) -> Arc<Pod> {
        let ips: Vec<&str> = ips.split(',').filter(|s| !s.is_empty()).collect();
        let pod_ip = ips
            .first()
            .map(|ip| format!("  podIP: \"{ip}\"\n"))
            .unwrap_or_default();
        let pod_ips = ips.iter().fold(String::new(), |mut out, ip| {
            let _ = writeln!(out, "  - ip: \"{ip}\"");
            out
        });
        let pod_ips = if ips.is_empty() {
            String::new()
        } else {
            format!("  podIPs:\n{pod_ips}")
        };
        let status = if ready { "True" } else { "False" };
        Arc::new(yaml(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  \
             uid: uid-{name}\n  labels: {{{labels}}}\nspec:\n  nodeName: node1\n  containers:\n  \
             - name: c\n    ports:\n    - name: http\n      containerPort: 8080\n    - name: dns\n      \
             containerPort: 5353\n      protocol: UDP\n{extra_spec}status:\n  phase: Running\n{pod_ip}{pod_ips}  \
             conditions:\n  - type: Ready\n    status: \"{status}\"\n"
        )))
    }

    const WEB: &str = "metadata:\n  name: web\n  namespace: default\nspec:\n  clusterIP: 198.19.0.1\n  \
                       selector: {app: web}\n  ports:\n  - name: http\n    port: 80\n    targetPort: http\n";

    /// Every slice as one line: `name family [ports] endpoints`, endpoints as
    /// `addr(pod node r/s/t)` with `r`, `s`, `t` or `-` for each condition.
    fn render(slices: &[Arc<EndpointSlice>]) -> Vec<String> {
        slices
            .iter()
            .map(|s| {
                let ports: Vec<String> = s
                    .ports
                    .iter()
                    .flatten()
                    .map(|p| {
                        format!(
                            "{}/{}/{}",
                            p.name.as_deref().unwrap_or("?"),
                            p.protocol.as_deref().unwrap_or("?"),
                            p.port.unwrap_or(0)
                        )
                    })
                    .collect();
                let eps: Vec<String> = s
                    .endpoints
                    .iter()
                    .map(|e| {
                        let c = e.conditions.clone().unwrap_or_default();
                        let flag =
                            |v: Option<bool>, ch: char| if v == Some(true) { ch } else { '-' };
                        let t = e.target_ref.clone().unwrap_or_default();
                        format!(
                            "{}({}/{} uid={} {} {}{}{})",
                            e.addresses.join("+"),
                            t.namespace.unwrap_or_default(),
                            t.name.unwrap_or_default(),
                            t.uid.unwrap_or_default(),
                            e.node_name.as_deref().unwrap_or("-"),
                            flag(c.ready, 'r'),
                            flag(c.serving, 's'),
                            flag(c.terminating, 't'),
                        )
                    })
                    .collect();
                format!(
                    "{} {} [{}] {}",
                    s.metadata.name.as_deref().unwrap_or("?"),
                    s.address_type,
                    ports.join(","),
                    eps.join(" ")
                )
            })
            .collect()
    }

    struct Row {
        name: &'static str,
        services: Vec<Arc<Svc>>,
        pods: Vec<Arc<Pod>>,
        want: &'static [&'static str],
    }

    #[test]
    #[expect(clippy::too_many_lines, reason = "one table of cases")]
    fn pods_and_services_give_the_controllers_slices() {
        let terminating = |p: Arc<Pod>| {
            let mut p = (*p).clone();
            p.metadata.deletion_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                ));
            Arc::new(p)
        };
        let phase = |p: Arc<Pod>, phase: &str| {
            let mut p = (*p).clone();
            p.status.as_mut().unwrap().phase = Some(phase.to_owned());
            Arc::new(p)
        };
        let in_namespace = |p: Arc<Pod>, ns: &str| {
            let mut p = (*p).clone();
            p.metadata.namespace = Some(ns.to_owned());
            Arc::new(p)
        };
        let rows = vec![
            Row {
                name: "labels select, named targetPort resolved, ready from the Ready condition",
                services: vec![service(WEB)],
                pods: vec![
                    pod("web-1", "app: web", "198.18.1.2", true, ""),
                    pod("web-0", "app: web, tier: x", "198.18.1.1", false, ""),
                    pod("db-0", "app: db", "198.18.1.3", true, ""),
                ],
                want: &[
                    "web-pods-ipv4-0 IPv4 [http/TCP/8080] 198.18.1.1(default/web-0 uid=uid-web-0 node1 ---) \
                     198.18.1.2(default/web-1 uid=uid-web-1 node1 rs-)",
                ],
            },
            Row {
                name: "every selector term must match; other namespaces never do",
                services: vec![service(
                    "metadata:\n  name: web\nspec:\n  clusterIP: 198.19.0.1\n  selector: {app: web, tier: x}\n  \
                     ports:\n  - port: 80\n    targetPort: 9000\n",
                )],
                pods: vec![
                    pod("web-0", "app: web, tier: x", "198.18.1.1", true, ""),
                    pod("web-1", "app: web", "198.18.1.2", true, ""),
                    in_namespace(
                        pod("web-2", "app: web, tier: x", "198.18.1.3", true, ""),
                        "other",
                    ),
                ],
                want: &[
                    "web-pods-ipv4-0 IPv4 [/TCP/9000] 198.18.1.1(default/web-0 uid=uid-web-0 node1 rs-)",
                ],
            },
            Row {
                name: "terminating: not ready, serving as the Ready condition says; terminal phases and no IP left out",
                services: vec![service(WEB)],
                pods: vec![
                    terminating(pod("web-0", "app: web", "198.18.1.1", true, "")),
                    terminating(pod("web-1", "app: web", "198.18.1.2", false, "")),
                    phase(
                        pod("web-2", "app: web", "198.18.1.3", true, ""),
                        "Succeeded",
                    ),
                    phase(pod("web-3", "app: web", "198.18.1.4", true, ""), "Failed"),
                    pod("web-4", "app: web", "", true, ""),
                    phase(pod("web-5", "app: web", "198.18.1.6", false, ""), "Pending"),
                ],
                want: &[
                    "web-pods-ipv4-0 IPv4 [http/TCP/8080] 198.18.1.1(default/web-0 uid=uid-web-0 node1 -st) \
                     198.18.1.2(default/web-1 uid=uid-web-1 node1 --t) 198.18.1.6(default/web-5 uid=uid-web-5 node1 ---)",
                ],
            },
            Row {
                name: "publishNotReadyAddresses: every pod ready, terminating ones too",
                services: vec![service(&format!("{WEB}  publishNotReadyAddresses: true\n"))],
                pods: vec![
                    pod("web-0", "app: web", "198.18.1.1", false, ""),
                    terminating(pod("web-1", "app: web", "198.18.1.2", true, "")),
                ],
                want: &[
                    "web-pods-ipv4-0 IPv4 [http/TCP/8080] 198.18.1.1(default/web-0 uid=uid-web-0 node1 r--) \
                     198.18.1.2(default/web-1 uid=uid-web-1 node1 rst)",
                ],
            },
            Row {
                name: "a name resolving to different numbers: one port group (slice) per number; \
                       a pod without the name is left out of that port only",
                services: vec![service(
                    "metadata:\n  name: web\nspec:\n  clusterIP: 198.19.0.1\n  selector: {app: web}\n  ports:\n  \
                     - name: http\n    port: 80\n    targetPort: http\n  - name: dns\n    port: 53\n    \
                     protocol: UDP\n    targetPort: dns\n",
                )],
                pods: vec![
                    pod("web-0", "app: web", "198.18.1.1", true, ""),
                    pod(
                        "web-1",
                        "app: web",
                        "198.18.1.2",
                        true,
                        "  - name: d\n    ports:\n    - name: other\n      containerPort: 1\n",
                    ),
                    Arc::new(yaml(
                        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web-2\n  labels: {app: web}\nspec:\n  \
                         containers:\n  - name: c\n    ports:\n    - {name: http, containerPort: 8081}\n    \
                         - {name: dns, containerPort: 5353, protocol: TCP}\nstatus:\n  podIP: 198.18.1.3\n  \
                         conditions: [{type: Ready, status: \"True\"}]\n",
                    )),
                ],
                want: &[
                    "web-pods-ipv4-0 IPv4 [http/TCP/8080,dns/UDP/5353] 198.18.1.1(default/web-0 uid=uid-web-0 node1 rs-) \
                     198.18.1.2(default/web-1 uid=uid-web-1 node1 rs-)",
                    "web-pods-ipv4-1 IPv4 [http/TCP/8081] 198.18.1.3(default/web-2 uid= - rs-)",
                ],
            },
            Row {
                name: "restartable init containers (sidecars) resolve names; other init containers do not",
                services: vec![service(
                    "metadata:\n  name: web\nspec:\n  clusterIP: 198.19.0.1\n  selector: {app: web}\n  ports:\n  \
                     - name: m\n    port: 9\n    targetPort: metrics\n",
                )],
                pods: vec![
                    pod(
                        "web-0",
                        "app: web",
                        "198.18.1.1",
                        true,
                        "  initContainers:\n  - name: s\n    \
                         restartPolicy: Always\n    ports:\n    - {name: metrics, containerPort: 9090}\n",
                    ),
                    pod(
                        "web-1",
                        "app: web",
                        "198.18.1.2",
                        true,
                        "  initContainers:\n  - name: s\n    \
                         ports:\n    - {name: metrics, containerPort: 9090}\n",
                    ),
                ],
                want: &[
                    "web-pods-ipv4-0 IPv4 [] 198.18.1.2(default/web-1 uid=uid-web-1 node1 rs-)",
                    "web-pods-ipv4-1 IPv4 [m/TCP/9090] 198.18.1.1(default/web-0 uid=uid-web-0 node1 rs-)",
                ],
            },
            Row {
                name: "dual stack: one slice set per family of the Service, address per family",
                services: vec![service(
                    "metadata:\n  name: web\nspec:\n  clusterIP: 198.19.0.1\n  ipFamilies: [IPv4, IPv6]\n  \
                     selector: {app: web}\n  ports:\n  - name: http\n    port: 80\n    targetPort: 8080\n",
                )],
                pods: vec![
                    pod("web-0", "app: web", "198.18.1.1,2001:db8::1", true, ""),
                    pod("web-1", "app: web", "2001:db8::2", true, ""),
                ],
                want: &[
                    "web-pods-ipv4-0 IPv4 [http/TCP/8080] 198.18.1.1(default/web-0 uid=uid-web-0 node1 rs-)",
                    "web-pods-ipv6-0 IPv6 [http/TCP/8080] 2001:db8::1(default/web-0 uid=uid-web-0 node1 rs-) \
                     2001:db8::2(default/web-1 uid=uid-web-1 node1 rs-)",
                ],
            },
            Row {
                name: "without ipFamilies the clusterIP's family; unset targetPort is the port",
                services: vec![service(
                    "metadata:\n  name: web\nspec:\n  clusterIP: 2001:db8::10\n  selector: {app: web}\n  \
                     ports:\n  - port: 80\n",
                )],
                pods: vec![pod("web-0", "app: web", "198.18.1.1,2001:db8::1", true, "")],
                want: &[
                    "web-pods-ipv6-0 IPv6 [/TCP/80] 2001:db8::1(default/web-0 uid=uid-web-0 node1 rs-)",
                ],
            },
            Row {
                name: "no selector, empty selector, ExternalName: no computed slices",
                services: vec![
                    service(
                        "metadata:\n  name: a\nspec:\n  clusterIP: 198.19.0.1\n  ports: [{port: 80}]\n",
                    ),
                    service(
                        "metadata:\n  name: b\nspec:\n  clusterIP: 198.19.0.2\n  selector: {}\n  ports: [{port: 80}]\n",
                    ),
                    service(
                        "metadata:\n  name: c\nspec:\n  type: ExternalName\n  externalName: x.example\n  selector: {app: web}\n",
                    ),
                ],
                pods: vec![pod("web-0", "app: web", "198.18.1.1", true, "")],
                want: &[],
            },
        ];
        for row in rows {
            let out = slices_from_pods(&row.services, &row.pods, &[], &[]);
            assert_eq!(out.errors, [], "{}", row.name);
            assert_eq!(render(&out.computed), row.want, "{}", row.name);
            // The order of the inputs does not matter.
            let mut pods = row.pods.clone();
            pods.reverse();
            let mut services = row.services.clone();
            services.reverse();
            let again = slices_from_pods(&services, &pods, &[], &[]);
            assert_eq!(render(&again.computed), row.want, "{} (reversed)", row.name);
        }
    }

    #[test]
    fn computed_slices_program_the_frontend() {
        let pods = [
            pod("web-0", "app: web", "198.18.1.1", true, ""),
            pod("web-1", "app: web", "198.18.1.2", false, ""),
        ];
        let services = [service(WEB)];
        let out = slices_from_pods(&services, &pods, &[], &[]);
        let snapshot = crate::model::Snapshot {
            services: services.to_vec(),
            slices: out.slices,
            nodes: Vec::new(),
        };
        let state = crate::model::compute(&snapshot, "node1");
        assert_eq!(state.errors, []);
        let frontend = state.frontends.values().next().unwrap();
        let backends: Vec<String> = frontend
            .backends
            .iter()
            .map(|b| format!("{}:{} local={}", b.addr, b.port, b.local))
            .collect();
        assert_eq!(backends, ["198.18.1.1:8080 local=true"]);
        assert_eq!(
            out.selections,
            [Selection {
                namespace: "default".into(),
                name: "web".into(),
                selector: "app==web".into(),
                pods: vec!["web-0".into(), "web-1".into()],
                ready: 1,
            }]
        );
        assert_eq!(
            out.selections[0].to_string(),
            "default/web app==web: 2 pods (1 ready)"
        );
    }

    #[test]
    fn the_selector_wins_over_hand_written_slices() {
        let slice = |name: &str, service: &str| -> Arc<Slice> {
            let slice: EndpointSlice = yaml(&format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  \
                 labels: {{kubernetes.io/service-name: {service}}}\naddressType: IPv4\nendpoints: []\n"
            ));
            Arc::new(slice.into())
        };
        let services = [
            service(WEB),
            service(
                "metadata:\n  name: manual\nspec:\n  clusterIP: 198.19.0.2\n  ports: [{port: 80}]\n",
            ),
        ];
        let slices = [slice("web-by-hand", "web"), slice("manual-1", "manual")];
        let out = slices_from_pods(&services, &[], &slices, &[]);
        let names: Vec<&str> = out
            .slices
            .iter()
            .map(|s| s.name.as_deref().unwrap())
            .collect();
        assert_eq!(
            names,
            ["manual-1"],
            "a selector Service without pods has no slices"
        );
        assert_eq!(
            out.ignored_slices,
            [IgnoredSlice {
                namespace: "default".into(),
                slice: "web-by-hand".into(),
                service: "web".into(),
            }]
        );
        assert_eq!(
            out.ignored_slices[0].to_string(),
            "EndpointSlice default/web-by-hand is ignored: Service default/web has a selector, \
             its endpoints are computed from Pods"
        );
    }

    #[test]
    fn bad_pods_are_reported_with_their_field_and_skipped() {
        let bad = |name: &str, status: &str, ports: &str| -> Arc<Pod> {
            Arc::new(yaml(&format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {{app: web}}\nspec:\n  \
                 containers:\n  - name: c\n    ports: {ports}\nstatus:\n{status}"
            )))
        };
        let pods = [
            bad("ip", "  podIP: not-an-ip\n", "[]"),
            bad(
                "ips",
                "  podIPs: [{ip: 198.18.1.1}, {ip: 198.18.1.2}]\n",
                "[]",
            ),
            bad(
                "mismatch",
                "  podIP: 198.18.1.1\n  podIPs: [{ip: 198.18.1.2}]\n",
                "[]",
            ),
            bad(
                "port",
                "  podIP: 198.18.1.3\n",
                "[{name: http, containerPort: 70000}]",
            ),
            bad(
                "proto",
                "  podIP: 198.18.1.4\n",
                "[{name: http, containerPort: 80, protocol: ICMP}]",
            ),
            bad("", "  podIP: 198.18.1.5\n", "[]"),
            pod("good", "app: web", "198.18.1.9", true, ""),
        ];
        let out = slices_from_pods(&[service(WEB)], &pods, &[], &[]);
        let errors: Vec<String> = out.errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            errors,
            [
                "Pod default/<unnamed>: metadata.name: missing",
                "Pod default/ip: status.podIP: \"not-an-ip\" is not an IP address",
                "Pod default/ips: status.podIPs[1].ip: \"198.18.1.2\": a Pod has at most one address per IP family",
                "Pod default/mismatch: status.podIPs[0].ip: \"198.18.1.2\" differs from status.podIP \"198.18.1.1\"",
                "Pod default/port: spec.containers[0].ports[0].containerPort: 70000 is not in 1..=65535",
                "Pod default/proto: spec.containers[0].ports[0].protocol: unknown protocol \"ICMP\" (expected TCP, UDP or SCTP)",
            ]
        );
        assert_eq!(
            render(&out.computed),
            [
                "web-pods-ipv4-0 IPv4 [http/TCP/8080] 198.18.1.9(default/good uid=uid-good node1 rs-)"
            ]
        );
    }

    #[test]
    fn bad_target_ports_and_duplicate_pods_are_reported() {
        let svc = service(
            "metadata:\n  name: web\nspec:\n  clusterIP: 198.19.0.1\n  selector: {app: web}\n  ports:\n  \
             - {name: a, port: 80, targetPort: 70000}\n  - {name: b, port: 81, targetPort: 8080}\n",
        );
        let twin = {
            let mut p = (*pod("web-0", "app: web", "198.18.1.2", true, "")).clone();
            p.metadata.uid = Some("other".into());
            Arc::new(p)
        };
        let pods = [pod("web-0", "app: web", "198.18.1.1", true, ""), twin];
        let out = slices_from_pods(&[svc], &pods, &[], &[]);
        let errors: Vec<String> = out.errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            errors,
            [
                "Pod default/web-0: metadata.name: 2 objects have this name and they differ; all are ignored",
                "Service default/web: spec.ports[0].targetPort: 70000 is not in 1..=65535",
            ]
        );
        assert_eq!(render(&out.computed), Vec::<String>::new());
    }

    /// Every endpoint as `addr zone=Z zones=[..] nodes=[..]` (`-` for no zone, `none` for no
    /// `hints`).
    fn render_hints(slices: &[Arc<EndpointSlice>]) -> Vec<String> {
        let names = |v: Option<Vec<String>>| v.map(|v| v.join(",")).unwrap_or_default();
        slices
            .iter()
            .flat_map(|s| &s.endpoints)
            .map(|e| {
                let hints = e.hints.as_ref().map_or("none".to_owned(), |h| {
                    format!(
                        "zones=[{}] nodes=[{}]",
                        names(
                            h.for_zones
                                .as_ref()
                                .map(|z| z.iter().map(|z| z.name.clone()).collect())
                        ),
                        names(
                            h.for_nodes
                                .as_ref()
                                .map(|n| n.iter().map(|n| n.name.clone()).collect())
                        ),
                    )
                });
                format!(
                    "{} zone={} {hints}",
                    e.addresses.join("+"),
                    e.zone.as_deref().unwrap_or("-")
                )
            })
            .collect()
    }

    #[test]
    #[expect(clippy::too_many_lines, reason = "one table of cases")]
    fn traffic_distribution_gives_the_controllers_hints() {
        let node = |name: &str, zone: &str| -> Arc<Node> {
            let labels = if zone.is_empty() {
                String::new()
            } else {
                format!("  labels:\n    topology.kubernetes.io/zone: {zone}\n")
            };
            Arc::new(yaml(&format!(
                "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n{labels}"
            )))
        };
        let nodes = [
            node("node1", "zone-a"),
            node("node2", "zone-b"),
            node("node3", ""),
        ];
        let on = |p: Arc<Pod>, node: &str| {
            let mut p = (*p).clone();
            p.spec.as_mut().unwrap().node_name = Some(node.to_owned());
            Arc::new(p)
        };
        // node1 (zone-a), node2 (zone-b), node3 (no zone label), node9 (no Node object), and
        // a not-ready Pod on node1.
        let pods = [
            pod("web-0", "app: web", "198.18.1.1", true, ""),
            on(pod("web-1", "app: web", "198.18.1.2", true, ""), "node2"),
            on(pod("web-2", "app: web", "198.18.1.3", true, ""), "node3"),
            on(pod("web-3", "app: web", "198.18.1.4", true, ""), "node9"),
            pod("web-4", "app: web", "198.18.1.5", false, ""),
        ];
        let with = |extra: &str| service(&format!("{WEB}{extra}"));
        let rows: [(&str, Arc<Svc>, [&str; 5]); 6] = [
            (
                "no trafficDistribution: zones, no hints",
                with(""),
                [
                    "198.18.1.1 zone=zone-a none",
                    "198.18.1.2 zone=zone-b none",
                    "198.18.1.3 zone=- none",
                    "198.18.1.4 zone=- none",
                    "198.18.1.5 zone=zone-a none",
                ],
            ),
            (
                "PreferClose: each ready endpoint with a zone gets its zone",
                with("  trafficDistribution: PreferClose\n"),
                [
                    "198.18.1.1 zone=zone-a zones=[zone-a] nodes=[]",
                    "198.18.1.2 zone=zone-b zones=[zone-b] nodes=[]",
                    "198.18.1.3 zone=- none",
                    "198.18.1.4 zone=- none",
                    "198.18.1.5 zone=zone-a none",
                ],
            ),
            (
                "PreferSameZone: as PreferClose",
                with("  trafficDistribution: PreferSameZone\n"),
                [
                    "198.18.1.1 zone=zone-a zones=[zone-a] nodes=[]",
                    "198.18.1.2 zone=zone-b zones=[zone-b] nodes=[]",
                    "198.18.1.3 zone=- none",
                    "198.18.1.4 zone=- none",
                    "198.18.1.5 zone=zone-a none",
                ],
            ),
            (
                "PreferSameNode: its node too, also without a zone",
                with("  trafficDistribution: PreferSameNode\n"),
                [
                    "198.18.1.1 zone=zone-a zones=[zone-a] nodes=[node1]",
                    "198.18.1.2 zone=zone-b zones=[zone-b] nodes=[node2]",
                    "198.18.1.3 zone=- zones=[] nodes=[node3]",
                    "198.18.1.4 zone=- zones=[] nodes=[node9]",
                    "198.18.1.5 zone=zone-a none",
                ],
            ),
            (
                "an unknown value: no hints",
                with("  trafficDistribution: PreferFar\n"),
                [
                    "198.18.1.1 zone=zone-a none",
                    "198.18.1.2 zone=zone-b none",
                    "198.18.1.3 zone=- none",
                    "198.18.1.4 zone=- none",
                    "198.18.1.5 zone=zone-a none",
                ],
            ),
            (
                "the topology-mode Auto annotation wins over trafficDistribution (not implemented)",
                service(&format!(
                    "{}  trafficDistribution: PreferClose\n",
                    WEB.replace(
                        "  namespace: default\n",
                        "  namespace: default\n  annotations: \
                         {service.kubernetes.io/topology-mode: Auto}\n",
                    )
                )),
                [
                    "198.18.1.1 zone=zone-a none",
                    "198.18.1.2 zone=zone-b none",
                    "198.18.1.3 zone=- none",
                    "198.18.1.4 zone=- none",
                    "198.18.1.5 zone=zone-a none",
                ],
            ),
        ];
        for (name, svc, want) in rows {
            let out = slices_from_pods(&[svc], &pods, &[], &nodes);
            assert_eq!(out.errors, [], "{name}");
            assert_eq!(render_hints(&out.computed), want, "{name}");
        }
    }

    #[test]
    fn computed_zone_hints_steer_this_node() {
        let nodes: Vec<Arc<Node>> = [("node1", "zone-a"), ("node2", "zone-b")]
            .iter()
            .map(|(n, z)| {
                Arc::new(yaml(&format!(
                    "apiVersion: v1\nkind: Node\nmetadata:\n  name: {n}\n  labels:\n    \
                     topology.kubernetes.io/zone: {z}\n"
                )))
            })
            .collect();
        let mut far = (*pod("web-1", "app: web", "198.18.2.1", true, "")).clone();
        far.spec.as_mut().unwrap().node_name = Some("node2".to_owned());
        let pods = [
            pod("web-0", "app: web", "198.18.1.1", true, ""),
            Arc::new(far),
        ];
        let services = [service(&format!(
            "{WEB}  trafficDistribution: PreferClose\n"
        ))];
        let out = slices_from_pods(&services, &pods, &[], &nodes);
        let snapshot = crate::model::Snapshot {
            services: services.to_vec(),
            slices: out.slices,
            nodes,
        };
        for (node, addr) in [("node1", "198.18.1.1"), ("node2", "198.18.2.1")] {
            let state = crate::model::compute(&snapshot, node);
            let frontend = state.frontends.values().next().unwrap();
            let backends: Vec<String> = frontend
                .backends
                .iter()
                .map(|b| b.addr.to_string())
                .collect();
            assert_eq!(backends, [addr], "{node}");
        }
    }

    #[test]
    fn large_selections_are_split_in_slices_of_100() {
        let pods: Vec<Arc<Pod>> = (0..250)
            .map(|i| {
                pod(
                    &format!("web-{i:03}"),
                    "app: web",
                    &format!("198.18.{}.{}", i / 200, i % 200 + 1),
                    true,
                    "",
                )
            })
            .collect();
        let out = slices_from_pods(&[service(WEB)], &pods, &[], &[]);
        let sizes: Vec<usize> = out.slices.iter().map(|s| s.endpoints.len()).collect();
        assert_eq!(sizes, [100, 100, 50]);
        assert_eq!(out.selections[0].pods.len(), 250);
    }

    // -----------------------------------------------------------------------------------------
    // PodSlicer against slices_from_pods
    // -----------------------------------------------------------------------------------------

    mod slicer {
        use std::collections::{BTreeMap, HashMap};

        use proptest::prelude::*;

        use super::*;

        const NAMESPACES: [&str; 2] = ["default", "other"];

        /// A Service variant: 0 absent, 1 selector app=a, 2 selector app=b, 3 no selector,
        /// 4 app=a with a bad targetPort, 5 app=a `PreferSameNode`, 6 app=a `ExternalName`.
        fn service_variant(ns: &str, name: &str, variant: u8) -> Option<Arc<Svc>> {
            let spec = match variant {
                1 => {
                    "  selector: {app: a}\n  ports:\n  - {name: http, port: 80, targetPort: http}\n"
                }
                2 => {
                    "  selector: {app: b}\n  ports:\n  - {name: http, port: 80, targetPort: 8080}\n"
                }
                3 => "  ports:\n  - {name: http, port: 80, targetPort: 8080}\n",
                4 => {
                    "  selector: {app: a}\n  ports:\n  - {name: http, port: 80, targetPort: 70000}\n"
                }
                5 => {
                    "  selector: {app: a}\n  trafficDistribution: PreferSameNode\n  ports:\n  \
                      - {name: http, port: 80, targetPort: http}\n"
                }
                6 => "  type: ExternalName\n  selector: {app: a}\n",
                _ => return None,
            };
            Some(service(&format!(
                "metadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  clusterIP: 198.19.0.1\n{spec}"
            )))
        }

        /// A Pod variant: 0 absent, 1 app=a ready, 2 app=b not ready, 3 app=a without an
        /// address, 4 app=a with a bad address, 5 app=a on node2, 6 app=a,b-less terminal.
        fn pod_variant(ns: &str, name: &str, index: usize, variant: u8) -> Option<Arc<Pod>> {
            let ip = format!("198.18.0.{}", 10 + index);
            let (labels, ip, ready, node, phase) = match variant {
                1 => ("app: a", ip.as_str(), true, "node1", "Running"),
                2 => ("app: b", ip.as_str(), false, "node1", "Running"),
                3 => ("app: a", "", true, "node1", "Running"),
                4 => ("app: a", "198.18.0.x", true, "node1", "Running"),
                5 => ("app: a", ip.as_str(), true, "node2", "Running"),
                6 => ("app: a", ip.as_str(), true, "node1", "Succeeded"),
                _ => return None,
            };
            let ip_line = if ip.is_empty() {
                String::new()
            } else {
                format!("  podIP: \"{ip}\"\n")
            };
            Some(Arc::new(yaml(&format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  \
                 labels: {{{labels}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    \
                 ports:\n    - {{name: http, containerPort: 8080}}\nstatus:\n  phase: {phase}\n\
                 {ip_line}  conditions:\n  - {{type: Ready, status: \"{}\"}}\n",
                if ready { "True" } else { "False" }
            ))))
        }

        /// A hand-written slice variant: 0 absent, 1 for s0, 2 for s1, 3 for s3 (the
        /// Service without a selector), 4 for s2 but named like s0's computed slice.
        fn slice_variant(ns: &str, index: usize, variant: u8) -> Option<(String, Arc<Slice>)> {
            let (name, owner) = match variant {
                1 => (format!("e{index}"), "s0"),
                2 => (format!("e{index}"), "s1"),
                3 => (format!("e{index}"), "s3"),
                4 => ("s0-pods-ipv4-0".to_owned(), "s2"),
                _ => return None,
            };
            let slice: EndpointSlice = yaml(&format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  \
                 namespace: {ns}\n  labels:\n    kubernetes.io/service-name: {owner}\naddressType: IPv4\n\
                 endpoints:\n- addresses: [\"198.18.1.{index}\"]\nports:\n- {{name: http, port: 8080}}\n"
            ));
            Some((name, Arc::new(slice.into())))
        }

        fn nodes_variant(variant: u8) -> Vec<Arc<Node>> {
            let node = |name: &str, zone: &str| -> Arc<Node> {
                Arc::new(yaml(&format!(
                    "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels:\n    \
                     topology.kubernetes.io/zone: \"{zone}\"\n"
                )))
            };
            match variant {
                1 => vec![node("node1", "z1")],
                2 => vec![node("node1", "z1"), node("node2", "z2")],
                3 => vec![node("node1", "z2"), node("node2", "z2")],
                _ => Vec::new(),
            }
        }

        /// One change: which object (kind, namespace, index), its variant, and its copies (1:
        /// one, 2: two identical, 3: two differing).
        #[derive(Clone, Debug)]
        enum Op {
            Service(usize, usize, u8, u8),
            Pod(usize, usize, u8, u8),
            Slice(usize, usize, u8, u8),
            Nodes(u8),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                (0..2usize, 0..4usize, 0..7u8, 1..4u8)
                    .prop_map(|(n, i, v, c)| Op::Service(n, i, v, c)),
                (0..2usize, 0..4usize, 0..7u8, 1..4u8).prop_map(|(n, i, v, c)| Op::Pod(n, i, v, c)),
                (0..2usize, 0..3usize, 0..5u8, 1..4u8)
                    .prop_map(|(n, i, v, c)| Op::Slice(n, i, v, c)),
                (0..4u8).prop_map(Op::Nodes),
            ]
        }

        /// `copies` of `object`: the object, twice, or it and a variant of it that differs.
        fn copies<T: Clone>(
            object: Option<Arc<T>>,
            copies: u8,
            differ: impl Fn(&mut T),
        ) -> Vec<Arc<T>> {
            let Some(object) = object else {
                return Vec::new();
            };
            match copies {
                2 => vec![Arc::clone(&object), Arc::new((*object).clone())],
                3 => {
                    let mut other = (*object).clone();
                    differ(&mut other);
                    vec![object, Arc::new(other)]
                }
                _ => vec![object],
            }
        }

        fn uid(meta: &mut ObjectMeta) {
            meta.uid = Some("other".to_owned());
        }

        /// The objects as the source holds them, by name.
        #[derive(Default)]
        struct Objects {
            services: BTreeMap<Key, Vec<Arc<Svc>>>,
            pods: BTreeMap<Key, Vec<Arc<Pod>>>,
            slices: Written,
            nodes: Vec<Arc<Node>>,
        }

        /// What the model is handed, by slice name.
        fn by_name(slices: &[Arc<Slice>]) -> BTreeMap<Key, Vec<Slice>> {
            let mut named: BTreeMap<Key, Vec<Slice>> = BTreeMap::new();
            for slice in slices {
                let key = key_of(
                    namespace_of(slice.namespace.as_deref()),
                    slice.name.as_deref().unwrap_or_default(),
                );
                named.entry(key).or_default().push((**slice).clone());
            }
            named
        }

        type Written = BTreeMap<Key, Vec<Arc<Slice>>>;

        /// The test's hand-written slices, as the source's.
        impl HandWrittenSlices for Written {
            fn copies(&self, namespace: &str, name: &str) -> Vec<Arc<Slice>> {
                self.get(&key_of(namespace, name))
                    .cloned()
                    .unwrap_or_default()
            }

            fn all(&self) -> Vec<Arc<Slice>> {
                flat(self)
            }
        }

        fn model_view(
            slicer: &PodSlicer,
            written: &Written,
            names: &[Key],
        ) -> BTreeMap<Key, Vec<Slice>> {
            names
                .iter()
                .map(|k| {
                    let copies = slicer.slice_copies(&k.0, &k.1, written);
                    (k.clone(), copies.iter().map(|c| (**c).clone()).collect())
                })
                .filter(|(_, c): &(Key, Vec<Slice>)| !c.is_empty())
                .collect()
        }

        fn flat<T>(objects: &BTreeMap<Key, Vec<Arc<T>>>) -> Vec<Arc<T>> {
            objects.values().flatten().cloned().collect()
        }

        fn run(batches: &[Vec<Op>]) -> Result<(), TestCaseError> {
            let mut slicer = PodSlicer::new();
            let mut objects = Objects::default();
            // Every slice name that can exist.
            let mut names: Vec<Key> = Vec::new();
            for ns in NAMESPACES {
                for s in 0..4 {
                    for family in ["ipv4", "ipv6"] {
                        names.push(key_of(ns, &format!("s{s}-pods-{family}-0")));
                    }
                }
                for e in 0..3 {
                    names.push(key_of(ns, &format!("e{e}")));
                }
            }
            let mut before = model_view(&slicer, &objects.slices, &names);
            for batch in batches {
                for op in batch {
                    match *op {
                        Op::Service(n, i, v, c) => {
                            let (ns, name) = (NAMESPACES[n], format!("s{i}"));
                            let now = copies(service_variant(ns, &name, v), c, |s| {
                                s.metadata.uid = Some("other".to_owned());
                            });
                            slicer.set_service(ns, &name, &now);
                            objects.services.insert(key_of(ns, &name), now);
                        }
                        Op::Pod(n, i, v, c) => {
                            let (ns, name) = (NAMESPACES[n], format!("p{i}"));
                            let now =
                                copies(pod_variant(ns, &name, i, v), c, |p| uid(&mut p.metadata));
                            slicer.set_pod(ns, &name, &now);
                            objects.pods.insert(key_of(ns, &name), now);
                        }
                        Op::Slice(n, i, v, c) => {
                            let ns = NAMESPACES[n];
                            // The variant's name, and the one it replaces: e<i> or the colliding one.
                            let (name, slice) = match slice_variant(ns, i, v) {
                                Some((name, slice)) => (name, Some(slice)),
                                None => (format!("e{i}"), None),
                            };
                            let now = copies(slice, c, |s| s.uid = Some("other".to_owned()));
                            objects.slices.insert(key_of(ns, &name), now);
                            slicer.slice_changed(ns, &name);
                        }
                        Op::Nodes(v) => {
                            let nodes = nodes_variant(v);
                            slicer.set_nodes(nodes.clone());
                            objects.nodes = nodes;
                        }
                    }
                }
                let changes = slicer.update(&objects.slices);

                let services: Vec<Arc<Svc>> = flat(&objects.services);
                let pods: Vec<Arc<Pod>> = flat(&objects.pods);
                let written: Vec<Arc<Slice>> = flat(&objects.slices);
                let oracle = slices_from_pods(&services, &pods, &written, &objects.nodes);
                prop_assert_eq!(
                    by_name(&slicer.slices(&objects.slices)),
                    by_name(&oracle.slices)
                );
                prop_assert_eq!(slicer.errors(), &oracle.errors[..]);
                prop_assert_eq!(slicer.ignored_slices(), oracle.ignored_slices.clone());
                prop_assert_eq!(slicer.selections(), oracle.selections.clone());
                let mut all: Vec<Key> = names.clone();
                all.extend(by_name(&oracle.slices).into_keys());
                all.sort();
                all.dedup();
                let after = model_view(&slicer, &objects.slices, &all);
                prop_assert_eq!(&after, &by_name(&oracle.slices), "slice_copies");
                // Every slice whose copies changed is named.
                for name in &all {
                    if before.get(name) != after.get(name) {
                        prop_assert!(changes.slices.contains(name), "{name:?} changed, not named");
                    }
                }
                // Every changed selection is reported.
                let selected: HashMap<(String, String), Selection> = changes
                    .selections
                    .iter()
                    .map(|s| ((s.namespace.clone(), s.name.clone()), s.clone()))
                    .collect();
                for selection in &oracle.selections {
                    let key = (selection.namespace.clone(), selection.name.clone());
                    if let Some(reported) = selected.get(&key) {
                        prop_assert_eq!(reported, selection);
                    }
                }
                before = after;
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Random batches of changes: after each update the slicer holds what
            /// `slices_from_pods` computes from the same objects, and names every slice
            /// whose copies changed.
            #[test]
            fn the_slicer_follows_slices_from_pods(
                batches in prop::collection::vec(prop::collection::vec(op(), 1..6), 1..12)
            ) {
                run(&batches)?;
            }
        }

        /// A change to one Pod computes again only the selector Services it matches.
        #[test]
        fn a_pod_change_computes_only_the_services_it_matches() {
            let mut slicer = PodSlicer::new();
            for (i, variant) in [1u8, 2, 1, 3].into_iter().enumerate() {
                let name = format!("s{i}");
                let svc = service_variant("default", &name, variant)
                    .into_iter()
                    .collect::<Vec<_>>();
                slicer.set_service("default", &name, &svc);
            }
            slicer.set_service(
                "other",
                "s0",
                &service_variant("other", "s0", 1)
                    .into_iter()
                    .collect::<Vec<_>>(),
            );
            slicer.set_pod(
                "default",
                "p0",
                &pod_variant("default", "p0", 0, 1)
                    .into_iter()
                    .collect::<Vec<_>>(),
            );
            let none = Written::new();
            slicer.update(&none);

            // p1 (app=b) appears: only s1 selects app=b.
            slicer.set_pod(
                "default",
                "p1",
                &pod_variant("default", "p1", 1, 2)
                    .into_iter()
                    .collect::<Vec<_>>(),
            );
            let changes = slicer.update(&none);
            let computed: Vec<&str> = changes.selections.iter().map(|s| s.name.as_str()).collect();
            assert_eq!(computed, ["s1"]);
            assert_eq!(
                changes.slices.into_iter().collect::<Vec<_>>(),
                [key_of("default", "s1-pods-ipv4-0")]
            );

            // p0 relabelled app=a -> app=b: the Services of both labels in its namespace.
            slicer.set_pod(
                "default",
                "p0",
                &pod_variant("default", "p0", 0, 2)
                    .into_iter()
                    .collect::<Vec<_>>(),
            );
            let changes = slicer.update(&none);
            let computed: Vec<&str> = changes.selections.iter().map(|s| s.name.as_str()).collect();
            assert_eq!(computed, ["s0", "s1", "s2"]);

            // Nothing changed: nothing computed.
            slicer.set_pod(
                "default",
                "p0",
                &pod_variant("default", "p0", 0, 2)
                    .into_iter()
                    .collect::<Vec<_>>(),
            );
            assert_eq!(slicer.update(&none), PodSliceChanges::default());
        }
    }
}
