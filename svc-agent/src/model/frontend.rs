//! The output types: frontends (virtual addresses) and their backends.

use std::{fmt, net::IpAddr, sync::Arc, time::Duration};

use ipnet::IpNet;

/// A transport protocol a Service port can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// `TCP` (the default when a port names none).
    Tcp,
    /// `UDP`.
    Udp,
    /// `SCTP` (accepted by the model; the datapath may not support it yet).
    Sctp,
}

impl Protocol {
    /// Parses a Kubernetes protocol name (`TCP`, `UDP` or `SCTP`, case-sensitive as in the
    /// API); `None` for anything else.
    #[must_use]
    pub fn from_k8s(name: &str) -> Option<Self> {
        match name {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }

    /// The Kubernetes name of the protocol.
    #[must_use]
    pub fn as_k8s(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_k8s())
    }
}

/// Where the traffic a frontend captures comes from; decides which traffic policy applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// A `ClusterIP`, reached from inside the cluster (`internalTrafficPolicy`).
    Internal,
    /// A `NodePort`, `LoadBalancer` ingress or external IP reached from outside the cluster
    /// (`externalTrafficPolicy`).
    External,
}

/// One virtual address the dataplane captures: `addr:port/proto` for traffic of `scope`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendKey {
    /// The virtual IP (IPv4 or IPv6).
    pub addr: IpAddr,
    /// The Service port.
    pub port: u16,
    /// The transport protocol.
    pub proto: Protocol,
    /// Which traffic this frontend is for.
    pub scope: Scope,
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scope = match self.scope {
            Scope::Internal => "internal",
            Scope::External => "external",
        };
        match self.addr {
            IpAddr::V4(addr) => write!(f, "{addr}:{}/{} ({scope})", self.port, self.proto),
            IpAddr::V6(addr) => write!(f, "[{addr}]:{}/{} ({scope})", self.port, self.proto),
        }
    }
}

/// The Service port a frontend belongs to (for counters, logs and the debug tool).
///
/// Shared strings: the frontends of one Service (ports x addresses) and the desired state's
/// copy of each share them.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortRef {
    /// The Service's namespace.
    pub namespace: Arc<str>,
    /// The Service's name.
    pub name: Arc<str>,
    /// The port's name (empty for an unnamed port).
    pub port_name: Arc<str>,
}

/// What a frontend does with a new connection while it has no backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EmptyAction {
    /// The Service has no usable endpoint anywhere: reject at once (TCP reset, ICMP
    /// unreachable) so the client does not wait for a timeout.
    Reject,
    /// Endpoints exist but none may be used from here: drop silently, counted under the
    /// reason.
    Drop(DropReason),
}

/// Why a frontend drops traffic instead of rejecting it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// `internalTrafficPolicy: Local` and no usable endpoint on this node (but some elsewhere).
    InternalTrafficPolicyLocal,
    /// `externalTrafficPolicy: Local` and no usable endpoint on this node (but some elsewhere).
    ExternalTrafficPolicyLocal,
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InternalTrafficPolicyLocal => {
                f.write_str("internalTrafficPolicy Local: no local endpoint")
            }
            Self::ExternalTrafficPolicyLocal => {
                f.write_str("externalTrafficPolicy Local: no local endpoint")
            }
        }
    }
}

/// What kind of address a frontend is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKind {
    /// A `ClusterIP` (scope internal only): its unlisted ports are refused.
    ClusterIp,
    /// A node address at a `nodePort`.
    NodePort,
    /// One of `spec.externalIPs`.
    ExternalIp,
    /// A load balancer's ingress IP (`status.loadBalancer.ingress[].ip`, `ipMode` not `Proxy`).
    LoadBalancerIp,
}

impl FrontendKind {
    /// The name `inspect` shows.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClusterIp => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::ExternalIp => "ExternalIP",
            Self::LoadBalancerIp => "LoadBalancer",
        }
    }
}

/// Everything the dataplane needs to serve one frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    /// The Service port this frontend belongs to.
    pub service: ServicePortRef,
    /// What kind of address it is on.
    pub kind: FrontendKind,
    /// Client prefixes allowed to reach it (`loadBalancerSourceRanges`, on the external scope
    /// of a load balancer's IPs only); empty: every client.
    pub source_ranges: Vec<IpNet>,
    /// `sessionAffinity: ClientIP`: how long a client sticks to its backend (refreshed on use).
    pub affinity_timeout: Option<Duration>,
    /// New connections may only go to endpoints on this node (the scope's traffic policy is
    /// Local).
    pub local_only: bool,
    /// The backends new connections choose from, sorted by address and port, no duplicates.
    pub backends: Vec<Backend>,
    /// Backends that take no new connections but whose established connections must keep
    /// working (terminating while ready ones exist, remote ones under a Local policy, ...).
    /// Sorted, no duplicates, disjoint from `backends`.
    pub kept_backends: Vec<Backend>,
    /// Backends still listed but neither ready, serving nor terminating (a Pod failing its
    /// readiness probe): no new connections, and only established TCP connections keep them
    /// (they stay in `BACKENDS_V1`); their UDP flows, UDP sockets and affinity entries are
    /// cleared like those of an ended backend, as kube-proxy clears UDP conntrack entries of
    /// endpoints that are not serving. Sorted, no duplicates, disjoint from the others.
    pub unready_backends: Vec<Backend>,
    /// What to do with a new connection when `backends` is empty (only meaningful then).
    pub on_empty: EmptyAction,
}

impl Frontend {
    /// Gives back the room its vectors hold beyond their length (a frontend is kept for as
    /// long as its Service exists).
    pub fn shrink_to_fit(&mut self) {
        self.backends.shrink_to_fit();
        self.kept_backends.shrink_to_fit();
        self.unready_backends.shrink_to_fit();
        self.source_ranges.shrink_to_fit();
    }
}

/// One endpoint (`podIP:targetPort`) of a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    /// The endpoint's address (same family as the frontend).
    pub addr: IpAddr,
    /// The endpoint's port (the Service's `targetPort` as resolved in the `EndpointSlice`).
    pub port: u16,
    /// The endpoint runs on this node (`nodeName` is this node's name).
    pub local: bool,
    /// The endpoint is terminating.
    pub terminating: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_names_round_trip_and_are_case_sensitive() {
        for proto in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
            assert_eq!(Protocol::from_k8s(proto.as_k8s()), Some(proto));
            assert_eq!(proto.to_string(), proto.as_k8s());
        }
        assert_eq!(Protocol::from_k8s("tcp"), None);
        assert_eq!(Protocol::from_k8s("ICMP"), None);
        assert_eq!(Protocol::from_k8s(""), None);
    }

    #[test]
    fn frontend_key_display_brackets_ipv6() {
        let v4 = FrontendKey {
            addr: "198.19.0.1".parse().unwrap(),
            port: 443,
            proto: Protocol::Tcp,
            scope: Scope::Internal,
        };
        assert_eq!(v4.to_string(), "198.19.0.1:443/TCP (internal)");
        let v6 = FrontendKey {
            addr: "2001:db8::1".parse().unwrap(),
            port: 53,
            proto: Protocol::Udp,
            scope: Scope::External,
        };
        assert_eq!(v6.to_string(), "[2001:db8::1]:53/UDP (external)");
    }

    #[test]
    fn drop_reason_says_why() {
        assert_eq!(
            DropReason::InternalTrafficPolicyLocal.to_string(),
            "internalTrafficPolicy Local: no local endpoint"
        );
    }
}
