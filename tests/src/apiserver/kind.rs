//! The kinds the test API server serves, and where each lives in the URL space.

use std::fmt;

/// A kind of object the test API server stores and serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// `v1` `Service`, namespaced, at `/api/v1/.../services`.
    Service,
    /// `discovery.k8s.io/v1` `EndpointSlice`, namespaced, at
    /// `/apis/discovery.k8s.io/v1/.../endpointslices`.
    EndpointSlice,
    /// `v1` `Node`, cluster-scoped, at `/api/v1/nodes`.
    Node,
    /// `events.k8s.io/v1` `Event`, namespaced, at `/apis/events.k8s.io/v1/.../events`; the
    /// only kind clients may also create (`POST`) and merge-patch (`PATCH`).
    Event,
}

impl Kind {
    /// Every kind served.
    pub const ALL: [Self; 4] = [Self::Service, Self::EndpointSlice, Self::Node, Self::Event];

    /// The kind as objects name it (`Service`).
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
            Self::Node => "Node",
            Self::Event => "Event",
        }
    }

    /// The `apiVersion` of the kind (`v1`, `discovery.k8s.io/v1`).
    #[must_use]
    pub fn api_version(self) -> &'static str {
        match self {
            Self::Service | Self::Node => "v1",
            Self::EndpointSlice => "discovery.k8s.io/v1",
            Self::Event => "events.k8s.io/v1",
        }
    }

    /// The resource name in URLs (`services`).
    #[must_use]
    pub fn plural(self) -> &'static str {
        match self {
            Self::Service => "services",
            Self::EndpointSlice => "endpointslices",
            Self::Node => "nodes",
            Self::Event => "events",
        }
    }

    /// Whether objects of the kind live in a namespace.
    #[must_use]
    pub fn namespaced(self) -> bool {
        !matches!(self, Self::Node)
    }

    /// The URL prefix of the kind's API group and version (`/api/v1`).
    pub(crate) fn prefix(self) -> &'static str {
        match self {
            Self::Service | Self::Node => "/api/v1",
            Self::EndpointSlice => "/apis/discovery.k8s.io/v1",
            Self::Event => "/apis/events.k8s.io/v1",
        }
    }

    /// The kind an object with this `apiVersion` and `kind` is, if it is served.
    #[must_use]
    pub fn of(api_version: &str, kind: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.api_version() == api_version && k.name() == kind)
    }

    /// The kind of a `k8s-openapi` type, if it is served.
    #[must_use]
    pub fn of_resource<K: k8s_openapi::Resource>() -> Option<Self> {
        Self::of(K::API_VERSION, K::KIND)
    }

    /// Whether the API server accepts `field` in a field selector for this kind (the same
    /// fields the real one accepts; it answers anything else with 400).
    pub(crate) fn supports_field(self, field: &str) -> bool {
        match field {
            "metadata.name" => true,
            "metadata.namespace" => self.namespaced(),
            "spec.clusterIP" | "spec.type" => self == Self::Service,
            "spec.unschedulable" => self == Self::Node,
            _ => false,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
