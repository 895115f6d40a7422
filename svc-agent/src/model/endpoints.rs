//! `EndpointSlice`s: validating them, finding the endpoints of a Service port, and choosing
//! which of them take new connections.
//!
//! Rules (kube-proxy's, `pkg/proxy/endpointslicecache.go` and `topology.go`):
//! - a slice belongs to the Service named by its `kubernetes.io/service-name` label in its own
//!   namespace; slices without the label are not for a proxy and are ignored;
//! - `addressType` `IPv4`/`IPv6` slices serve frontends of that family only; `FQDN` slices are
//!   ignored;
//! - a Service port uses the slice port with the same name (both empty for an unnamed port)
//!   and protocol, and takes the port number from it, so a named `targetPort` may resolve to
//!   different numbers in different slices;
//! - a slice port without a number ("all ports", allowed for slices not derived from a
//!   Service) is skipped, like kube-proxy does; it is valid API, so it is no error;
//! - only the first of an endpoint's `addresses` is used (kube-proxy does the same; the API
//!   defines no meaning for the others);
//! - conditions: `ready` nil = true, `serving` nil = true, `terminating` nil = false, as the
//!   API documents them and kube-proxy reads them;
//! - `local` = the endpoint's `nodeName` is this node's name;
//! - topology (`CategorizeEndpoints` / `topologyModeFromHints`): for a frontend using the
//!   cluster's endpoints (not `internalTrafficPolicy: Local`), when every ready endpoint has
//!   `hints.forNodes` and one names this node, new connections go to the ready endpoints hinted
//!   for this node (same node); else when every ready endpoint has `hints.forZones` and one
//!   names this node's zone (its Node's `topology.kubernetes.io/zone` label), to those hinted
//!   for this zone (same zone); otherwise to every ready endpoint. An endpoint missing hints,
//!   a node without a zone label or no endpoint for this node's zone means all endpoints. The
//!   terminating fallback (no ready endpoint anywhere) ignores topology. Ready endpoints left
//!   out by topology keep their established connections.
//!
//! The same address:port may be listed in several slices (for example while the controller
//! moves an endpoint between slices). kube-proxy keeps whichever slice it happens to read last
//! (preferring a local one); here the most usable copy wins (ready, then serving, then not
//! terminating, then local), which does not depend on the order of the slices.

use std::{collections::BTreeMap, fmt, net::IpAddr, sync::Arc};

use super::{
    Backend, ObjectError, Protocol, Slice, SliceEndpoint as Endpoint, namespace_of,
    service::TrafficPolicy, slice_owner,
};

/// Where this node is, for topology hints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Place<'a> {
    /// This node's name (empty: unknown, nothing is local).
    pub node: &'a str,
    /// This node's zone (`topology.kubernetes.io/zone`), if it has one.
    pub zone: Option<&'a str>,
}

impl<'a> Place<'a> {
    pub(crate) fn new(node: &'a str, zone: Option<&'a str>) -> Self {
        Self { node, zone }
    }
}

/// What one kind of an endpoint's hints (`forNodes` or `forZones`) says about this node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Hint {
    /// No hint of this kind.
    #[default]
    Missing,
    /// Hints of this kind, none naming this node (or its zone).
    Elsewhere,
    /// A hint names this node (or its zone).
    Here,
}

impl Hint {
    /// From a list of hinted names and this node's name (or zone).
    fn of<'n>(names: impl Iterator<Item = &'n str>, here: Option<&str>) -> Self {
        let mut any = false;
        for name in names {
            any = true;
            if here.is_some_and(|h| h == name) {
                return Self::Here;
            }
        }
        if any { Self::Elsewhere } else { Self::Missing }
    }
}

/// An endpoint's topology hints, relative to this node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Hints {
    pub node: Hint,
    pub zone: Hint,
}

/// Which ready endpoints take new connections of a frontend using the cluster's endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TopologyMode {
    /// Every ready endpoint.
    All,
    /// Those hinted for this node (`PreferSameNode`).
    SameNode,
    /// Those hinted for this node's zone (`PreferSameZone`, `PreferClose`).
    SameZone,
}

impl TopologyMode {
    fn allows(self, c: &Candidate) -> bool {
        match self {
            Self::All => true,
            Self::SameNode => c.hints.node == Hint::Here,
            Self::SameZone => c.hints.zone == Hint::Here,
        }
    }
}

/// Why a frontend's endpoints carry topology hints that were not used (all endpoints were).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HintsIgnored {
    /// Some ready endpoints carry hints, but not every one a zone hint, nor every one a node
    /// hint (typically: some endpoints have no hints at all).
    EndpointsWithoutHints,
    /// Every ready endpoint has a zone hint, but this node's Node has no
    /// `topology.kubernetes.io/zone` label.
    NodeWithoutZone,
    /// Every ready endpoint has a zone hint, none for this node's zone.
    NoEndpointForZone(String),
    /// Every ready endpoint has a node hint, none for this node, and not every one has a zone
    /// hint.
    NoEndpointForNode,
}

impl fmt::Display for HintsIgnored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::EndpointsWithoutHints => {
                f.write_str("not every ready endpoint has a zone hint, nor every one a node hint")
            }
            Self::NodeWithoutZone => {
                f.write_str("this node has no topology.kubernetes.io/zone label")
            }
            Self::NoEndpointForZone(zone) => {
                write!(
                    f,
                    "no ready endpoint is hinted for this node's zone {zone:?}"
                )
            }
            Self::NoEndpointForNode => f.write_str(
                "no ready endpoint is hinted for this node, and not every one has a zone hint",
            ),
        }
    }
}

/// `topologyModeFromHints`: the topology mode of a frontend with these `endpoints` on a node
/// in `zone`, and why hints present were not used (`None` when they were, or when there were
/// none).
fn topology_mode(
    endpoints: &[Candidate],
    zone: Option<&str>,
) -> (TopologyMode, Option<HintsIgnored>) {
    let ready = || endpoints.iter().filter(|c| c.conditions.ready);
    if ready().next().is_none() {
        return (TopologyMode::All, None);
    }
    let all_node = ready().all(|c| c.hints.node != Hint::Missing);
    let all_zone = ready().all(|c| c.hints.zone != Hint::Missing);
    if all_node && ready().any(|c| c.hints.node == Hint::Here) {
        return (TopologyMode::SameNode, None);
    }
    if all_zone && ready().any(|c| c.hints.zone == Hint::Here) {
        return (TopologyMode::SameZone, None);
    }
    let why = if all_zone {
        Some(zone.map_or(HintsIgnored::NodeWithoutZone, |z| {
            HintsIgnored::NoEndpointForZone(z.to_owned())
        }))
    } else if all_node {
        Some(HintsIgnored::NoEndpointForNode)
    } else if ready().any(|c| c.hints != Hints::default()) {
        Some(HintsIgnored::EndpointsWithoutHints)
    } else {
        None
    };
    (TopologyMode::All, why)
}

/// An endpoint's conditions, with the API's defaults applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Conditions {
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

/// One endpoint of a Service port, merged over all slices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Candidate {
    pub addr: IpAddr,
    pub port: u16,
    pub local: bool,
    pub conditions: Conditions,
    pub hints: Hints,
}

impl Candidate {
    /// Which of two copies of the same address:port wins (the greater).
    fn rank(&self) -> (bool, bool, bool, bool) {
        let c = self.conditions;
        (c.ready, c.serving, !c.terminating, self.local)
    }

    /// May take new connections when no ready endpoint is available (graceful termination).
    fn is_fallback(&self) -> bool {
        self.conditions.serving && self.conditions.terminating
    }

    /// Could take new connections (ready, or the terminating fallback).
    fn is_usable(&self) -> bool {
        self.conditions.ready || self.is_fallback()
    }

    /// Established connections to it should keep working even when it is not chosen.
    fn is_alive(&self) -> bool {
        let c = self.conditions;
        c.ready || c.serving || c.terminating
    }

    fn backend(&self) -> Backend {
        Backend {
            addr: self.addr,
            port: self.port,
            local: self.local,
            terminating: self.conditions.terminating,
        }
    }
}

/// A validated slice port.
#[derive(Debug)]
struct SlicePort<'a> {
    name: &'a str,
    proto: Protocol,
    port: u16,
}

/// A validated endpoint (its first address); `port` is filled from the slice port.
#[derive(Debug)]
struct SliceEndpoint {
    addr: IpAddr,
    local: bool,
    conditions: Conditions,
    hints: Hints,
}

/// A validated `IPv4` or `IPv6` slice.
#[derive(Debug)]
struct SliceView<'a> {
    ipv6: bool,
    ports: Vec<SlicePort<'a>>,
    endpoints: Vec<SliceEndpoint>,
}

/// The valid slices of each Service, by namespace and Service name.
#[derive(Debug, Default)]
pub(crate) struct SliceIndex<'a> {
    by_service: BTreeMap<(&'a str, &'a str), Vec<SliceView<'a>>>,
}

impl<'a> SliceIndex<'a> {
    /// Validates and indexes `slices`; one error per bad field is pushed onto `errors`. A slice
    /// with a bad field is skipped as a whole, except a bad endpoint: only that endpoint is.
    pub(crate) fn build(
        slices: &[&'a Slice],
        place: Place<'_>,
        errors: &mut Vec<ObjectError>,
    ) -> Self {
        let mut index = Self::default();
        for slice in slices {
            let Some(owner) = slice_owner(slice) else {
                continue;
            };
            if let Some(view) = parse_slice(slice, place, errors) {
                index.by_service.entry(owner).or_default().push(view);
            }
        }
        index
    }

    /// The endpoints of one Service port for frontends of `frontend_addr`'s family, merged
    /// over all slices, sorted by address and port, each address:port once.
    pub(crate) fn endpoints(
        &self,
        namespace: &str,
        service: &str,
        frontend_addr: IpAddr,
        port_name: &str,
        proto: Protocol,
    ) -> Vec<Candidate> {
        let mut merged: BTreeMap<(IpAddr, u16), Candidate> = BTreeMap::new();
        let slices = self.by_service.get(&(namespace, service));
        for slice in slices.into_iter().flatten() {
            if slice.ipv6 != frontend_addr.is_ipv6() {
                continue;
            }
            let ports = slice
                .ports
                .iter()
                .filter(|p| p.name == port_name && p.proto == proto);
            for port in ports {
                for ep in &slice.endpoints {
                    let candidate = Candidate {
                        addr: ep.addr,
                        port: port.port,
                        local: ep.local,
                        conditions: ep.conditions,
                        hints: ep.hints,
                    };
                    merged
                        .entry((ep.addr, port.port))
                        .and_modify(|kept| {
                            if candidate.rank() > kept.rank() {
                                *kept = candidate;
                            }
                        })
                        .or_insert(candidate);
                }
            }
        }
        merged.into_values().collect()
    }
}

/// Validates one slice linked to a Service. `None` when it is ignored (FQDN) or invalid.
fn parse_slice<'a>(
    slice: &'a Slice,
    place: Place<'_>,
    errors: &mut Vec<ObjectError>,
) -> Option<SliceView<'a>> {
    let namespace = namespace_of(slice.namespace.as_deref());
    let name = slice.name.as_deref().unwrap_or_default();
    let error = |field: String, reason: String| ObjectError {
        kind: "EndpointSlice",
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        field,
        reason,
    };
    // Errors that skip the whole slice.
    let mut fatal = Vec::new();
    if name.is_empty() {
        fatal.push(error("metadata.name".to_owned(), "missing".to_owned()));
    }

    let ipv6 = match &*slice.address_type {
        "IPv4" => false,
        "IPv6" => true,
        "FQDN" => return None,
        other => {
            errors.extend(fatal);
            errors.push(error(
                "addressType".to_owned(),
                format!("unknown address type {other:?} (expected IPv4, IPv6 or FQDN)"),
            ));
            return None;
        }
    };

    let listed_ports = &slice.ports[..];
    let mut ports: Vec<SlicePort<'a>> = Vec::with_capacity(listed_ports.len());
    for (i, port) in listed_ports.iter().enumerate() {
        let port_name = port.name.as_deref().unwrap_or_default();
        let proto = match port.protocol.as_deref() {
            None => Some(Protocol::Tcp),
            Some(p) => Protocol::from_k8s(p),
        };
        if proto.is_none() {
            fatal.push(error(
                format!("ports[{i}].protocol"),
                format!(
                    "unknown protocol {:?} (expected TCP, UDP or SCTP)",
                    port.protocol.as_deref().unwrap_or_default()
                ),
            ));
        }
        if let Some(first) = listed_ports[..i]
            .iter()
            .position(|p| p.name.as_deref().unwrap_or_default() == port_name)
        {
            fatal.push(error(
                format!("ports[{i}].name"),
                format!("duplicate port name {port_name:?} (also ports[{first}])"),
            ));
        }
        // No number: "all ports", which kube-proxy cannot program and skips; so do we.
        let Some(number) = port.port else {
            continue;
        };
        let Some(number) = u16::try_from(number).ok().filter(|&n| n != 0) else {
            fatal.push(error(
                format!("ports[{i}].port"),
                format!("{number} is not in 1..=65535"),
            ));
            continue;
        };
        if let Some(proto) = proto {
            ports.push(SlicePort {
                name: port_name,
                proto,
                port: number,
            });
        }
    }

    // A bad endpoint only loses itself: report it without skipping the slice.
    let mut endpoints = Vec::with_capacity(slice.endpoints.len());
    let mut endpoint_errors = Vec::new();
    for (i, ep) in slice.endpoints.iter().enumerate() {
        match parse_endpoint(ep, ipv6, place) {
            Ok(ep) => endpoints.push(ep),
            Err((field, reason)) => {
                endpoint_errors.push(error(format!("endpoints[{i}].{field}"), reason));
            }
        }
    }

    let valid = fatal.is_empty();
    errors.extend(fatal);
    errors.extend(endpoint_errors);
    valid.then_some(SliceView {
        ipv6,
        ports,
        endpoints,
    })
}

/// Validates one endpoint of a slice of family `ipv6`; on error, the bad field (relative to
/// the endpoint) and why.
fn parse_endpoint(
    ep: &Endpoint,
    ipv6: bool,
    place: Place<'_>,
) -> Result<SliceEndpoint, (&'static str, String)> {
    let Some(first) = &ep.address else {
        return Err((
            "addresses",
            "empty: an endpoint needs an address".to_owned(),
        ));
    };
    let addr = match first.parse::<IpAddr>() {
        Ok(addr) if addr.is_ipv6() == ipv6 => addr,
        Ok(_) => {
            let family = if ipv6 { "IPv6" } else { "IPv4" };
            return Err((
                "addresses[0]",
                format!("{first:?} is not an {family} address (the slice's addressType)"),
            ));
        }
        Err(_) => return Err(("addresses[0]", format!("{first:?} is not an IP address"))),
    };
    let local = !place.node.is_empty() && ep.node_name.as_deref() == Some(place.node);
    let node = (!place.node.is_empty()).then_some(place.node);
    let (for_nodes, for_zones) = ep
        .hints
        .as_deref()
        .map_or((&[][..], &[][..]), |h| (&h.for_nodes, &h.for_zones));
    let hints = Hints {
        node: Hint::of(for_nodes.iter().map(|n| &**n), node),
        zone: Hint::of(for_zones.iter().map(|z| &**z), place.zone),
    };
    Ok(SliceEndpoint {
        addr,
        local,
        hints,
        conditions: Conditions {
            ready: ep.ready.unwrap_or(true),
            serving: ep.serving.unwrap_or(true),
            terminating: ep.terminating.unwrap_or(false),
        },
    })
}

/// `namespace/name` of every endpoint's `targetRef` (its namespace defaulting to the slice's),
/// by the endpoint's first address; endpoints without a named `targetRef` or a valid address
/// are left out. Shared strings: the model keeps each name in a Service's output, in the
/// per-address counts and in the desired state, one allocation for all three.
pub(crate) fn target_names(slices: &[&Slice]) -> Vec<(IpAddr, Arc<str>)> {
    let mut names = Vec::new();
    for slice in slices {
        let namespace = namespace_of(slice.namespace.as_deref());
        for ep in &slice.endpoints {
            let Some(target) = ep.target.as_deref() else {
                continue;
            };
            let Some(addr) = ep.address.as_deref().and_then(|a| a.parse::<IpAddr>().ok()) else {
                continue;
            };
            let target_namespace = target.namespace.as_deref().unwrap_or(namespace);
            names.push((addr, format!("{target_namespace}/{}", target.name).into()));
        }
    }
    names
}

/// The backends of one frontend.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Selection {
    /// Take new connections.
    pub backends: Vec<Backend>,
    /// Keep their established connections.
    pub kept_backends: Vec<Backend>,
    /// Listed but neither ready, serving nor terminating: established TCP connections keep
    /// them, UDP flows do not.
    pub unready_backends: Vec<Backend>,
    /// Some endpoint anywhere could take new connections (ready or the terminating
    /// fallback): with a Local policy and no local backend, drop rather than reject.
    pub any_usable: bool,
    /// The endpoints carry topology hints this node did not use, and why.
    pub hints_ignored: Option<HintsIgnored>,
}

/// Chooses among a frontend's `endpoints` (sorted, unique) under `policy` on a node in `zone`.
///
/// New connections go to the ready endpoints (only local ones under `Local`; under `Cluster`
/// only those topology hints give this node, see the module documentation); when there are
/// none, to the serving and terminating ones (graceful termination; topology plays no part
/// there). Every other endpoint that is ready, serving or terminating keeps its established
/// connections; an endpoint that is none of these (a Pod failing its readiness probe) keeps
/// only its established TCP connections, as with kube-proxy, whose conntrack entries keep TCP
/// connections while it clears the UDP entries of endpoints that are not serving.
pub(crate) fn select_backends(
    endpoints: &[Candidate],
    policy: TrafficPolicy,
    zone: Option<&str>,
) -> Selection {
    let (mode, hints_ignored) = match policy {
        TrafficPolicy::Cluster => topology_mode(endpoints, zone),
        TrafficPolicy::Local => (TopologyMode::All, None),
    };
    let eligible = |c: &Candidate| policy == TrafficPolicy::Cluster || c.local;
    let ready_eligible = |c: &Candidate| eligible(c) && c.conditions.ready && mode.allows(c);
    let any_ready = endpoints.iter().any(ready_eligible);
    let chosen = |c: &Candidate| {
        if any_ready {
            ready_eligible(c)
        } else {
            eligible(c) && c.is_fallback()
        }
    };
    let mut selection = Selection {
        any_usable: endpoints.iter().any(Candidate::is_usable),
        hints_ignored,
        ..Selection::default()
    };
    for c in endpoints {
        if chosen(c) {
            selection.backends.push(c.backend());
        } else if c.is_alive() {
            selection.kept_backends.push(c.backend());
        } else {
            selection.unready_backends.push(c.backend());
        }
    }
    selection
}
