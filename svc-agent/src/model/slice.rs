//! `EndpointSlice`s as the model keeps them: only the fields it reads, made once when an object
//! arrives.
//!
//! A `k8s-openapi` `EndpointSlice` holds every optional field of the API inline: an `Endpoint`
//! is 352 bytes before its strings, a slice's metadata 360, and its one label a whole B-tree
//! node. At 30,000 Services (one slice of 3 endpoints each) the slices the source kept took
//! 73 MiB, 2,570 bytes and 22 allocations per slice (`svc-heap`). A [`Slice`] keeps what
//! `compute` reads, as the API gave it (the strings are not parsed here: validation and its
//! errors stay in the model, which names the field and the value), so the model computes the
//! same from a [`Slice`] as from the object it was made from.

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};

use std::sync::Arc;

use super::{
    LABEL_SERVICE_NAME,
    intern::{intern, intern_opt},
};

/// An `EndpointSlice`, reduced to what the model reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Slice {
    /// `metadata.namespace` (shared: see [`intern`](super::intern)).
    pub namespace: Option<Arc<str>>,
    /// `metadata.name`.
    pub name: Option<String>,
    /// `metadata.uid` (the Kubernetes source names it in Events).
    pub uid: Option<String>,
    /// The value of the `kubernetes.io/service-name` label: the Service it belongs to.
    pub service_name: Option<String>,
    /// `addressType` (shared).
    pub address_type: Arc<str>,
    /// `ports`.
    pub ports: Box<[SlicePort]>,
    /// `endpoints`.
    pub endpoints: Box<[SliceEndpoint]>,
}

/// One of a slice's `ports`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlicePort {
    /// `name` (shared).
    pub name: Option<Arc<str>>,
    /// `port` (none: all ports).
    pub port: Option<i32>,
    /// `protocol` (none: TCP; shared).
    pub protocol: Option<Arc<str>>,
}

/// One of a slice's `endpoints`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// The first of `addresses` (the only one a proxy uses), none when the list is empty.
    pub address: Option<String>,
    /// `conditions.ready` (none: true).
    pub ready: Option<bool>,
    /// `conditions.serving` (none: true).
    pub serving: Option<bool>,
    /// `conditions.terminating` (none: false).
    pub terminating: Option<bool>,
    /// `nodeName` (shared).
    pub node_name: Option<Arc<str>>,
    /// `hints`, when it names a node or a zone (most endpoints have none: boxed, 8 bytes).
    pub hints: Option<Box<SliceHints>>,
    /// `targetRef`'s namespace and name, when it has a name.
    pub target: Option<Box<Target>>,
}

/// An endpoint's `hints`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SliceHints {
    /// The names of `forNodes` (shared).
    pub for_nodes: Box<[Arc<str>]>,
    /// The names of `forZones` (shared).
    pub for_zones: Box<[Arc<str>]>,
}

/// An endpoint's `targetRef` (usually a Pod).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Target {
    /// `targetRef.namespace` (none: the slice's; shared).
    pub namespace: Option<Arc<str>>,
    /// `targetRef.name`.
    pub name: String,
}

impl From<EndpointSlice> for Slice {
    /// Keeps what the model reads, moving the strings (nothing is copied).
    fn from(slice: EndpointSlice) -> Self {
        let meta = slice.metadata;
        let service_name = meta
            .labels
            .and_then(|mut labels| labels.remove(LABEL_SERVICE_NAME));
        Self {
            namespace: intern_opt(meta.namespace.as_deref()),
            name: meta.name,
            uid: meta.uid,
            service_name,
            address_type: intern(&slice.address_type),
            ports: slice
                .ports
                .unwrap_or_default()
                .into_iter()
                .map(SlicePort::from)
                .collect(),
            endpoints: slice
                .endpoints
                .into_iter()
                .map(SliceEndpoint::from)
                .collect(),
        }
    }
}

impl From<&EndpointSlice> for Slice {
    fn from(slice: &EndpointSlice) -> Self {
        Self::from(slice.clone())
    }
}

impl From<EndpointPort> for SlicePort {
    fn from(port: EndpointPort) -> Self {
        Self {
            name: intern_opt(port.name.as_deref()),
            port: port.port,
            protocol: intern_opt(port.protocol.as_deref()),
        }
    }
}

impl From<Endpoint> for SliceEndpoint {
    fn from(ep: Endpoint) -> Self {
        let conditions = ep.conditions.unwrap_or_default();
        let hints = ep.hints.unwrap_or_default();
        let hints = SliceHints {
            for_nodes: (hints.for_nodes.iter().flatten())
                .map(|n| intern(&n.name))
                .collect(),
            for_zones: (hints.for_zones.iter().flatten())
                .map(|z| intern(&z.name))
                .collect(),
        };
        let hinted = !hints.for_nodes.is_empty() || !hints.for_zones.is_empty();
        Self {
            address: ep.addresses.into_iter().next(),
            ready: conditions.ready,
            serving: conditions.serving,
            terminating: conditions.terminating,
            node_name: intern_opt(ep.node_name.as_deref()),
            hints: hinted.then(|| Box::new(hints)),
            target: ep
                .target_ref
                .and_then(|t| {
                    t.name.filter(|n| !n.is_empty()).map(|name| Target {
                        namespace: intern_opt(t.namespace.as_deref()),
                        name,
                    })
                })
                .map(Box::new),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_support::yaml;

    #[test]
    fn keeps_what_the_model_reads() {
        let slice: EndpointSlice = yaml(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata:\n  name: web-abc\n  namespace: shop\n  uid: u-1\n\
             \x20 labels: {kubernetes.io/service-name: web, other: x}\n\
             addressType: IPv4\n\
             ports: [{name: http, port: 8080, protocol: TCP}, {name: all}]\n\
             endpoints:\n\
             - addresses: [198.18.1.1, 198.18.1.2]\n\
             \x20 conditions: {ready: false, terminating: true}\n\
             \x20 nodeName: node1\n\
             \x20 hints: {forZones: [{name: z1}], forNodes: [{name: node1}, {name: node2}]}\n\
             \x20 targetRef: {kind: Pod, name: web-0, namespace: shop, uid: p-1}\n\
             - addresses: []\n\
             \x20 targetRef: {kind: Pod}\n",
        );
        let lean = Slice::from(&slice);
        assert_eq!(
            lean,
            Slice {
                namespace: Some("shop".into()),
                name: Some("web-abc".into()),
                uid: Some("u-1".into()),
                service_name: Some("web".into()),
                address_type: "IPv4".into(),
                ports: vec![
                    SlicePort {
                        name: Some("http".into()),
                        port: Some(8080),
                        protocol: Some("TCP".into()),
                    },
                    SlicePort {
                        name: Some("all".into()),
                        port: None,
                        protocol: None,
                    },
                ]
                .into(),
                endpoints: vec![
                    SliceEndpoint {
                        address: Some("198.18.1.1".into()),
                        ready: Some(false),
                        serving: None,
                        terminating: Some(true),
                        node_name: Some("node1".into()),
                        hints: Some(Box::new(SliceHints {
                            for_nodes: vec!["node1".into(), "node2".into()].into(),
                            for_zones: vec!["z1".into()].into(),
                        })),
                        target: Some(Box::new(Target {
                            namespace: Some("shop".into()),
                            name: "web-0".into(),
                        })),
                    },
                    SliceEndpoint::default(),
                ]
                .into(),
            }
        );
    }
}
