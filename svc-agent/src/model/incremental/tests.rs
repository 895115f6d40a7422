//! Tests of the incremental [`Model`] against the oracle, [`compute`].

use std::{
    fmt::Write as _,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{
        core::v1::{
            LoadBalancerIngress, LoadBalancerStatus, Node, NodeAddress as K8sNodeAddress,
            NodeStatus, ObjectReference, Service, ServicePort, ServiceSpec, ServiceStatus,
        },
        discovery::v1::{
            Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice, ForNode,
            ForZone,
        },
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use proptest::{prelude::*, strategy::ValueTree as _};

use super::{Model, Name};
use crate::model::{
    Delta, DesiredState, FrontendKey, HintsIgnored, LABEL_HEADLESS, LABEL_SERVICE_NAME,
    LABEL_TOPOLOGY_ZONE, Memo, Protocol, Scope, Snapshot, Svc, compute, compute_with,
    test_support::yaml,
    tests::{slice, web},
};

const NODE: &str = "node1";

// ---------------------------------------------------------------------------------------------
// A model checked against compute after every update
// ---------------------------------------------------------------------------------------------

/// A [`Model`] with a mirror of its objects: every update is checked against [`compute`] of the
/// mirror, and its delta against [`Delta::between`] the states before and after.
struct Checked {
    model: Model,
    objects: Snapshot,
}

impl Checked {
    fn new() -> Self {
        Self {
            model: Model::new(NODE),
            objects: Snapshot::default(),
        }
    }

    fn service(&mut self, namespace: &str, name: &str, service: Option<Service>) {
        let service = service.map(|s| Arc::new(s.into()));
        let key = Name::new(namespace, name);
        self.objects
            .services
            .retain(|s| Name::of(&s.metadata) != key);
        self.objects.services.extend(service.clone());
        self.model.set_service(namespace, name, service);
    }

    fn slice(&mut self, namespace: &str, name: &str, slice: Option<EndpointSlice>) {
        let slice = slice.map(|s| Arc::new(s.into()));
        let key = Name::new(namespace, name);
        self.objects.slices.retain(|s| Name::of_slice(s) != key);
        self.objects.slices.extend(slice.clone());
        self.model.set_slice(namespace, name, slice);
    }

    /// Service `default/a` (198.19.0.1) with slice `a-1` (one endpoint, 198.18.0.1, Pod
    /// `pod-1`), updated.
    fn with_service_a() -> Self {
        let mut m = Self::new();
        m.service("default", "a", Some(web("a", "198.19.0.1", "")));
        m.slice(
            "default",
            "a-1",
            Some(web_slice("a-1", "a", &[("198.18.0.1", "pod-1")])),
        );
        m.update();
        m
    }

    fn nodes(&mut self, nodes: Vec<Arc<Node>>) {
        self.objects.nodes.clone_from(&nodes);
        self.model.set_nodes(nodes);
    }

    /// Updates, checks, and returns the delta.
    fn update(&mut self) -> Delta {
        let before = self.model.state().clone();
        let delta = self.model.update();
        self.check(&before, &delta);
        delta
    }

    /// Replaces, checks, and returns the delta.
    fn replace(&mut self, snapshot: Snapshot) -> Delta {
        let before = self.model.state().clone();
        let delta = self.model.replace(&snapshot);
        self.objects = snapshot;
        self.check(&before, &delta);
        delta
    }

    fn check(&self, before: &DesiredState, delta: &Delta) {
        let expected = compute(&self.objects, NODE);
        assert_eq!(self.model.state(), &expected, "state differs from compute");
        assert_eq!(
            delta,
            &Delta::between(before, &expected),
            "delta differs from the states' difference"
        );
    }

    fn state(&self) -> &DesiredState {
        self.model.state()
    }
}

// ---------------------------------------------------------------------------------------------
// Objects
// ---------------------------------------------------------------------------------------------

/// An IPv4 slice `default/name` labelled for `svc`, port `http` 8080, one ready endpoint per
/// `(address, pod)`.
fn web_slice(name: &str, svc: &str, endpoints: &[(&str, &str)]) -> EndpointSlice {
    let mut body = String::new();
    for (addr, pod) in endpoints {
        write!(
            body,
            r"
- addresses:
  - {addr}
  nodeName: node2
  targetRef:
    kind: Pod
    name: {pod}
"
        )
        .unwrap();
    }
    let endpoints = if endpoints.is_empty() { " []" } else { "" };
    slice(
        name,
        svc,
        &format!(
            r"
addressType: IPv4
ports:
- name: http
  port: 8080
  protocol: TCP
endpoints:{endpoints}{body}"
        ),
    )
}

fn tcp80(addr: &str) -> FrontendKey {
    FrontendKey {
        addr: addr.parse().unwrap(),
        port: 80,
        proto: Protocol::Tcp,
        scope: Scope::Internal,
    }
}

fn backend_addrs(state: &DesiredState, key: &FrontendKey) -> Vec<String> {
    state.frontends[key]
        .backends
        .iter()
        .map(|b| b.addr.to_string())
        .collect()
}

fn keys(keys: &[FrontendKey]) -> std::collections::BTreeSet<FrontendKey> {
    keys.iter().copied().collect()
}

// ---------------------------------------------------------------------------------------------
// Unit tests
// ---------------------------------------------------------------------------------------------

#[test]
fn nothing_dirty_means_no_work_and_an_empty_delta() {
    let mut m = Checked::new();
    assert!(m.update().is_empty());
    m.service("default", "a", Some(web("a", "198.19.0.1", "")));
    assert!(!m.update().is_empty());
    assert_eq!(m.model.recomputed(), 1);
    assert!(m.update().is_empty());
    assert_eq!(m.model.recomputed(), 0);
}

#[test]
fn only_the_changed_service_is_recomputed() {
    let mut m = Checked::new();
    for i in 0..10 {
        let name = format!("s{i}");
        m.service(
            "default",
            &name,
            Some(web(&name, &format!("198.19.0.{i}"), "")),
        );
        m.slice(
            "default",
            &format!("{name}-1"),
            Some(web_slice(
                &format!("{name}-1"),
                &name,
                &[("198.18.0.1", "p")],
            )),
        );
    }
    m.update();
    assert_eq!(m.model.recomputed(), 10);
    m.slice(
        "default",
        "s3-1",
        Some(web_slice("s3-1", "s3", &[("198.18.0.2", "p")])),
    );
    let delta = m.update();
    assert_eq!(m.model.recomputed(), 1);
    assert_eq!(delta.frontends, keys(&[tcp80("198.19.0.3")]));
    assert_eq!(delta.backend_names.len(), 1, "198.18.0.2 is new");
    // The same object again: dirty, but not recomputed.
    let same = m.model.slices[&Name::new("default", "s3-1")][0].clone();
    m.model.set_slice("default", "s3-1", Some(same));
    assert!(m.update().is_empty());
    assert_eq!(m.model.recomputed(), 0);
}

#[test]
fn a_relabelled_slice_moves_its_endpoints_to_the_new_service() {
    let mut m = Checked::new();
    m.service("default", "a", Some(web("a", "198.19.0.1", "")));
    m.service("default", "b", Some(web("b", "198.19.0.2", "")));
    m.slice(
        "default",
        "s",
        Some(web_slice("s", "a", &[("198.18.0.1", "pod-1")])),
    );
    m.update();
    assert_eq!(
        backend_addrs(m.state(), &tcp80("198.19.0.1")),
        ["198.18.0.1"]
    );
    assert!(
        m.state().frontends[&tcp80("198.19.0.2")]
            .backends
            .is_empty()
    );

    m.slice(
        "default",
        "s",
        Some(web_slice("s", "b", &[("198.18.0.1", "pod-1")])),
    );
    let delta = m.update();
    assert_eq!(
        delta.frontends,
        keys(&[tcp80("198.19.0.1"), tcp80("198.19.0.2")])
    );
    assert_eq!(m.model.recomputed(), 2, "the old owner is recomputed too");
    assert!(
        m.state().frontends[&tcp80("198.19.0.1")]
            .backends
            .is_empty()
    );
    assert_eq!(
        backend_addrs(m.state(), &tcp80("198.19.0.2")),
        ["198.18.0.1"]
    );
    assert!(delta.backend_names.is_empty(), "same pod name either way");

    // Without the label, the slice belongs to nobody.
    let mut unlabelled = web_slice("s", "b", &[("198.18.0.1", "pod-1")]);
    unlabelled.metadata.labels = None;
    m.slice("default", "s", Some(unlabelled));
    let delta = m.update();
    assert_eq!(delta.frontends, keys(&[tcp80("198.19.0.2")]));
    assert!(m.state().backend_names.is_empty());
}

#[test]
fn a_deleted_slice_takes_its_endpoints_away() {
    let mut m = Checked::new();
    m.service("default", "a", Some(web("a", "198.19.0.1", "")));
    m.slice(
        "default",
        "a-1",
        Some(web_slice("a-1", "a", &[("198.18.0.1", "pod-1")])),
    );
    m.slice(
        "default",
        "a-2",
        Some(web_slice("a-2", "a", &[("198.18.0.2", "pod-2")])),
    );
    m.update();
    assert_eq!(
        backend_addrs(m.state(), &tcp80("198.19.0.1")),
        ["198.18.0.1", "198.18.0.2"]
    );
    m.slice("default", "a-1", None);
    let delta = m.update();
    assert_eq!(
        backend_addrs(m.state(), &tcp80("198.19.0.1")),
        ["198.18.0.2"]
    );
    assert_eq!(delta.frontends, keys(&[tcp80("198.19.0.1")]));
    assert_eq!(
        delta.backend_names,
        ["198.18.0.1".parse().unwrap()].into_iter().collect()
    );
}

#[test]
fn a_deleted_service_keeps_its_slices_for_when_it_comes_back() {
    let mut m = Checked::with_service_a();
    m.service("default", "a", None);
    let delta = m.update();
    assert!(m.state().frontends.is_empty());
    assert!(
        m.state().backend_names.is_empty(),
        "names only come with a Service"
    );
    assert_eq!(delta.frontends, keys(&[tcp80("198.19.0.1")]));
    m.service("default", "a", Some(web("a", "198.19.0.9", "")));
    m.update();
    assert_eq!(
        backend_addrs(m.state(), &tcp80("198.19.0.9")),
        ["198.18.0.1"]
    );
    // Both gone: nothing is left behind.
    m.service("default", "a", None);
    m.slice("default", "a-1", None);
    m.update();
    assert!(m.model.groups.is_empty());
    assert!(m.model.claims.is_empty());
    assert!(m.model.names.is_empty());
    assert!(m.model.slices_by_owner.is_empty());
}

#[test]
fn key_conflicts_appear_and_resolve() {
    let mut m = Checked::new();
    let key = tcp80("198.19.0.1");
    m.service("default", "z", Some(web("z", "198.19.0.1", "")));
    m.slice(
        "default",
        "z-1",
        Some(web_slice("z-1", "z", &[("198.18.0.1", "pod-z")])),
    );
    m.update();
    assert_eq!(m.state().frontends[&key].service.name.as_ref(), "z");

    // An earlier Service by name takes the key; z gets the conflict error.
    m.service("default", "a", Some(web("a", "198.19.0.1", "")));
    let delta = m.update();
    assert_eq!(delta.frontends, keys(&[key]));
    assert!(delta.errors);
    assert_eq!(m.state().frontends[&key].service.name.as_ref(), "a");
    assert_eq!(m.state().errors.len(), 1);
    assert_eq!(m.state().errors[0].name, "z");
    assert!(
        m.state().errors[0]
            .reason
            .contains("is already used by Service default/a port \"http\"")
    );

    // A third claimant: two conflict errors.
    m.service("default", "m", Some(web("m", "198.19.0.1", "")));
    let delta = m.update();
    assert!(delta.frontends.is_empty(), "a keeps the key");
    assert_eq!(m.state().errors.len(), 2);

    // The owner goes: the next by name owns the key and the errors follow.
    m.service("default", "a", None);
    let delta = m.update();
    assert_eq!(delta.frontends, keys(&[key]));
    assert_eq!(m.state().frontends[&key].service.name.as_ref(), "m");
    assert_eq!(m.state().errors.len(), 1);
    assert!(m.state().errors[0].reason.contains("Service default/m"));

    // A loser moves away: no conflict left, and the owner's frontend is not rewritten.
    m.service("default", "z", Some(web("z", "198.19.0.2", "")));
    let delta = m.update();
    assert_eq!(delta.frontends, keys(&[tcp80("198.19.0.2")]));
    assert!(delta.errors);
    assert_eq!(m.state().errors, []);
    assert!(m.model.conflicted.is_empty());
    assert_eq!(
        backend_addrs(m.state(), &tcp80("198.19.0.2")),
        ["198.18.0.1"]
    );
}

#[test]
fn errors_appear_and_disappear() {
    let mut m = Checked::new();
    m.service("default", "a", Some(web("a", "198.19.0.1", "")));
    m.update();
    m.service(
        "default",
        "a",
        Some(web("a", "198.19.0.1", "  sessionAffinity: Sometimes\n")),
    );
    let delta = m.update();
    assert!(delta.errors);
    assert_eq!(delta.frontends, keys(&[tcp80("198.19.0.1")]));
    assert_eq!(m.state().errors[0].field, "spec.sessionAffinity");

    // A bad slice: its own error, the Service is fine.
    m.service("default", "a", Some(web("a", "198.19.0.1", "")));
    let mut bad = web_slice("a-1", "a", &[("198.18.0.1", "pod-1")]);
    bad.address_type = "IPv5".to_owned();
    m.slice("default", "a-1", Some(bad));
    let delta = m.update();
    assert!(delta.errors);
    assert_eq!(m.state().errors.len(), 1);
    assert_eq!(m.state().errors[0].kind, "EndpointSlice");

    // The same error again is no change.
    m.service("default", "a", Some(web("a", "198.19.0.1", "")));
    let delta = m.update();
    assert!(!delta.errors);
    m.slice("default", "a-1", None);
    assert!(m.update().errors);
    assert_eq!(m.state().errors, []);
}

#[test]
fn backend_names_take_the_smallest_and_follow_changes() {
    let mut m = Checked::new();
    let addr = "198.18.0.1".parse().unwrap();
    m.service("default", "a", Some(web("a", "198.19.0.1", "")));
    m.service("default", "b", Some(web("b", "198.19.0.2", "")));
    m.slice(
        "default",
        "b-1",
        Some(web_slice("b-1", "b", &[("198.18.0.1", "pod-z")])),
    );
    let delta = m.update();
    assert_eq!(delta.backend_names, [addr].into_iter().collect());
    assert_eq!(&*m.state().backend_names[&addr], "default/pod-z");
    m.slice(
        "default",
        "a-1",
        Some(web_slice("a-1", "a", &[("198.18.0.1", "pod-a")])),
    );
    let delta = m.update();
    assert_eq!(delta.backend_names, [addr].into_iter().collect());
    assert_eq!(&*m.state().backend_names[&addr], "default/pod-a");
    // The same name twice (two slices), one goes: still named.
    m.slice(
        "default",
        "a-2",
        Some(web_slice("a-2", "a", &[("198.18.0.1", "pod-a")])),
    );
    assert!(m.update().backend_names.is_empty());
    m.slice("default", "a-1", None);
    assert!(m.update().backend_names.is_empty());
    m.slice("default", "a-2", None);
    let delta = m.update();
    assert_eq!(delta.backend_names, [addr].into_iter().collect());
    assert_eq!(&*m.state().backend_names[&addr], "default/pod-z");
    m.service("default", "b", None);
    m.update();
    assert!(m.state().backend_names.is_empty());
}

#[test]
fn nodes_give_addresses_and_errors() {
    let mut m = Checked::new();
    let node: Node = yaml(
        r"
apiVersion: v1
kind: Node
metadata:
  name: node1
status:
  addresses:
  - address: 198.18.100.11
    type: InternalIP
  - address: 198.18.100.300
    type: InternalIP
",
    );
    m.nodes(vec![Arc::new(node)]);
    let delta = m.update();
    assert!(delta.nodes && delta.errors);
    assert_eq!(m.state().node_addresses.len(), 1);
    m.nodes(Vec::new());
    let delta = m.update();
    assert!(delta.nodes && delta.errors);
    assert_eq!(m.model.recomputed(), 0);
}

#[test]
fn replace_recomputes_only_what_differs() {
    let a = Arc::new(Svc::from(web("a", "198.19.0.1", "")));
    let b = Arc::new(Svc::from(web("b", "198.19.0.2", "")));
    let a1 = Arc::new(web_slice("a-1", "a", &[("198.18.0.1", "pod-1")]));
    let snap = Snapshot {
        services: vec![a.clone(), b.clone()],
        slices: vec![Arc::new((*a1).clone().into())],
        nodes: Vec::new(),
    };
    let mut m = Checked::new();
    m.replace(snap.clone());
    assert_eq!(m.model.recomputed(), 2);
    assert!(m.replace(snap.clone()).is_empty());
    assert_eq!(m.model.recomputed(), 0);
    // Equal copies (a relist): not recomputed, and the model holds the new objects.
    let copy = Snapshot {
        services: vec![Arc::new((*a).clone()), Arc::new((*b).clone())],
        slices: vec![Arc::new((*a1).clone().into())],
        nodes: Vec::new(),
    };
    assert!(m.replace(copy.clone()).is_empty());
    assert_eq!(m.model.recomputed(), 0);
    let held = m.model.groups[&Name::new("default", "a")]
        .service
        .clone()
        .unwrap();
    assert!(Arc::ptr_eq(&held, &copy.services[0]));
    // One changed slice: one Service.
    let mut changed = copy.clone();
    changed.slices = vec![Arc::new(
        web_slice("a-1", "a", &[("198.18.0.2", "pod-2")]).into(),
    )];
    let delta = m.replace(changed);
    assert_eq!(m.model.recomputed(), 1);
    assert_eq!(delta.frontends, keys(&[tcp80("198.19.0.1")]));
}

#[test]
fn replace_applies_the_duplicate_rule_and_reports_nameless_services() {
    let a = Arc::new(Svc::from(web("a", "198.19.0.1", "")));
    let a2 = Arc::new(Svc::from(web("a", "198.19.0.3", "")));
    let mut nameless = web("x", "198.19.0.4", "");
    nameless.metadata.name = None;
    let nameless = Arc::new(Svc::from(nameless));
    let mut m = Checked::new();
    // Identical copies merge.
    m.replace(Snapshot {
        services: vec![a.clone(), Arc::new((*a).clone())],
        ..Snapshot::default()
    });
    assert_eq!(m.state().errors, []);
    assert_eq!(m.state().frontends.len(), 1);
    // Differing copies: an error, none kept; nameless Services are each reported.
    m.replace(Snapshot {
        services: vec![a.clone(), a2, nameless.clone(), nameless],
        ..Snapshot::default()
    });
    assert!(m.state().frontends.is_empty());
    assert_eq!(
        m.state()
            .errors
            .iter()
            .map(|e| (e.name.as_str(), e.field.as_str()))
            .collect::<Vec<_>>(),
        [("", "metadata.name"), ("a", "metadata.name")]
    );
    // Setting the object ends the duplicate.
    m.service("default", "a", Some(web("a", "198.19.0.1", "")));
    m.update();
    assert_eq!(m.state().frontends.len(), 1);
    m.service("default", "", None);
    m.update();
    assert_eq!(m.state().errors, []);
}

/// An IPv4 slice `default/name` for `svc`, port `http` 8080, one ready endpoint per
/// `(address, forZones)` hinted for that zone.
fn zone_hinted_slice(name: &str, svc: &str, endpoints: &[(&str, &str)]) -> EndpointSlice {
    let mut slice = web_slice(name, svc, &[]);
    slice.endpoints = endpoints
        .iter()
        .map(|(addr, zone)| Endpoint {
            addresses: vec![(*addr).to_owned()],
            hints: Some(EndpointHints {
                for_zones: Some(vec![ForZone {
                    name: (*zone).to_owned(),
                }]),
                for_nodes: None,
            }),
            ..Endpoint::default()
        })
        .collect();
    slice
}

fn zoned_node1(zone: Option<&str>) -> Vec<Arc<Node>> {
    let labels: Vec<(&str, &str)> = zone.map(|z| (LABEL_TOPOLOGY_ZONE, z)).into_iter().collect();
    vec![Arc::new(Node {
        metadata: meta(None, NODE, &labels),
        ..Node::default()
    })]
}

#[test]
fn the_desired_state_holds_the_owners_copy_of_each_frontend() {
    let mut m = Checked::with_service_a();
    let shared = |m: &Checked| {
        let group = &m.model.groups[&Name::new("default", "a")];
        Arc::ptr_eq(
            &m.state().frontends[&tcp80("198.19.0.1")],
            &group.out.claims[0].frontend,
        )
    };
    assert!(shared(&m), "one copy, not two");
    // A zone appears: every Service is recomputed; a's frontend comes out the same (no delta)
    // and the state takes the new output's copy.
    m.nodes(zoned_node1(Some("zone-a")));
    let delta = m.update();
    assert_eq!(m.model.recomputed(), 1);
    assert!(delta.frontends.is_empty());
    assert!(shared(&m), "still one copy after a recompute");
}

#[test]
fn a_zone_change_recomputes_every_service_and_notes_follow() {
    let mut m = Checked::new();
    m.service("default", "a", Some(web("a", "198.19.0.1", "")));
    m.slice(
        "default",
        "a-1",
        Some(zone_hinted_slice(
            "a-1",
            "a",
            &[("198.18.0.1", "zone-a"), ("198.18.0.2", "zone-b")],
        )),
    );
    m.service("default", "b", Some(web("b", "198.19.0.2", "")));
    m.slice(
        "default",
        "b-1",
        Some(zone_hinted_slice("b-1", "b", &[("198.18.0.3", "zone-b")])),
    );
    // No Node yet: no zone, hints ignored with a note per Service.
    let delta = m.update();
    assert!(delta.topology_notes);
    let why = |state: &DesiredState| -> Vec<(String, HintsIgnored)> {
        (state.topology_notes.iter())
            .map(|n| (n.name.clone(), n.why.clone()))
            .collect()
    };
    assert_eq!(
        why(m.state()),
        [
            ("a".to_owned(), HintsIgnored::NodeWithoutZone),
            ("b".to_owned(), HintsIgnored::NodeWithoutZone)
        ]
    );
    assert_eq!(
        backend_addrs(m.state(), &tcp80("198.19.0.1")),
        ["198.18.0.1", "198.18.0.2"]
    );

    // In zone-a: a narrows to its zone-a endpoint, b has none for zone-a and keeps all.
    m.nodes(zoned_node1(Some("zone-a")));
    let delta = m.update();
    assert_eq!(m.model.recomputed(), 2, "every Service is recomputed");
    assert_eq!(delta.frontends, keys(&[tcp80("198.19.0.1")]));
    assert!(delta.topology_notes);
    assert_eq!(
        backend_addrs(m.state(), &tcp80("198.19.0.1")),
        ["198.18.0.1"]
    );
    assert_eq!(
        why(m.state()),
        [(
            "b".to_owned(),
            HintsIgnored::NoEndpointForZone("zone-a".to_owned())
        )]
    );

    // The same zone on a new Node object (its addresses changed): nothing recomputed.
    let mut node = zoned_node1(Some("zone-a"));
    Arc::make_mut(&mut node[0]).status = Some(NodeStatus {
        addresses: Some(vec![K8sNodeAddress {
            address: "198.18.100.1".to_owned(),
            type_: "InternalIP".to_owned(),
        }]),
        ..NodeStatus::default()
    });
    m.nodes(node);
    let delta = m.update();
    assert_eq!(m.model.recomputed(), 0);
    assert!(delta.nodes && !delta.topology_notes && delta.frontends.is_empty());

    // zone-c: no endpoint for it anywhere. a goes back to all; only the notes say why.
    m.nodes(zoned_node1(Some("zone-c")));
    let delta = m.update();
    assert_eq!(m.model.recomputed(), 2);
    assert_eq!(delta.frontends, keys(&[tcp80("198.19.0.1")]));
    assert_eq!(why(m.state()).len(), 2);

    // zone-d: the same frontends, other notes. Only the notes changed.
    m.nodes(zoned_node1(Some("zone-d")));
    let delta = m.update();
    assert_eq!(m.model.recomputed(), 2);
    assert!(delta.topology_notes && delta.frontends.is_empty() && !delta.nodes);
    assert!(!delta.is_empty());
    assert_eq!(
        why(m.state())[0].1,
        HintsIgnored::NoEndpointForZone("zone-d".to_owned())
    );

    // The notes go with their Service.
    m.service("default", "a", None);
    m.slice("default", "b-1", None);
    let delta = m.update();
    assert!(delta.topology_notes);
    assert_eq!(m.state().topology_notes, []);
    assert!(m.model.noting.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Property test: random changes over a small universe, checked against compute
// ---------------------------------------------------------------------------------------------

const NAMESPACES: [&str; 2] = ["default", "other"];
/// The last one is no name (a nameless object).
const SERVICE_NAMES: [&str; 5] = ["a", "b", "c", "d", ""];
const SLICE_NAMES: [&str; 7] = ["s1", "s2", "s3", "s4", "s5", "s6", ""];
const CLUSTER_IPS: [&str; 5] = [
    "198.19.0.1",
    "198.19.0.2",
    "2001:db8::1",
    "2001:db8::2",
    "bogus",
];
/// (name, port, protocol): overlapping so Services conflict, `alt` duplicates `http`.
const SERVICE_PORTS: [(&str, i32, &str); 4] = [
    ("http", 80, "TCP"),
    ("dns", 53, "UDP"),
    ("http-udp", 80, "UDP"),
    ("alt", 80, "TCP"),
];
const SLICE_PORTS: [(&str, i32, &str); 4] = [
    ("http", 8080, "TCP"),
    ("dns", 5353, "UDP"),
    ("http-udp", 8081, "UDP"),
    ("http", 0, "TCP"),
];
const ADDRESS_TYPES: [&str; 4] = ["IPv4", "IPv4", "IPv6", "FQDN"];
const ENDPOINT_ADDRS: [&str; 5] = [
    "198.18.0.1",
    "198.18.0.2",
    "198.18.0.3",
    "2001:db8::5",
    "nope",
];
const NODES: [&str; 2] = ["node1", "node2"];
/// Zones of Nodes, endpoints and hints; no Node is ever in `zone-c`, and an empty label is no
/// zone.
const ZONES: [&str; 4] = ["zone-a", "zone-b", "zone-c", ""];
const TRAFFIC_DISTRIBUTIONS: [&str; 4] = [
    "PreferClose",
    "PreferSameZone",
    "PreferSameNode",
    "PreferFar",
];

#[derive(Clone, Debug)]
struct ServiceGen {
    namespace: usize,
    /// Leave `metadata.namespace` out (only meaningful for `default`).
    implicit_namespace: bool,
    name: usize,
    ips: Vec<usize>,
    ports: Vec<usize>,
    local: bool,
    headless: bool,
    /// `TRAFFIC_DISTRIBUTIONS` index of `spec.trafficDistribution`, or none.
    traffic_distribution: Option<usize>,
    /// 0: `ClusterIP`; 1: `NodePort` (`nodePort` 30000 + the port's index); 2: as 1 and a
    /// `LoadBalancer` with `externalTrafficPolicy: Local`, health-check node port 32000, an
    /// ingress IP and an external IP (one of them also a node address).
    exposure: usize,
}

#[derive(Clone, Debug)]
struct EndpointGen {
    addr: usize,
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
    /// `NODES` index, or none.
    node: Option<usize>,
    /// `pod-N` in the slice's namespace, or none.
    pod: Option<usize>,
    /// `ZONES` index of the endpoint's `zone`, or none.
    zone: Option<usize>,
    /// Whether this endpoint has hints, when its slice hints only some endpoints.
    hinted: bool,
    /// `ZONES` indexes of `hints.forZones` (may be empty: `forZones: []`).
    for_zones: Vec<usize>,
    /// `NODES` indexes of `hints.forNodes` (may be empty: `forNodes: []`).
    for_nodes: Vec<usize>,
}

/// Which endpoints of a slice carry hints.
#[derive(Clone, Copy, Debug)]
enum HintStyle {
    /// None.
    None,
    /// Every endpoint: `forZones` only (what the controller writes for `PreferClose`).
    Zones,
    /// Every endpoint: `forZones` and `forNodes`.
    All,
    /// Every endpoint: `forNodes` only.
    NodesOnly,
    /// Those with `hinted` (the fallback for endpoints without hints).
    Some,
}

#[derive(Clone, Debug)]
struct SliceGen {
    namespace: usize,
    name: usize,
    /// `SERVICE_NAMES` index of the label, or no label.
    owner: Option<usize>,
    address_type: usize,
    ports: Vec<usize>,
    endpoints: Vec<EndpointGen>,
    hints: HintStyle,
}

#[derive(Clone, Debug)]
struct NodeGen {
    name: usize,
    addrs: Vec<usize>,
    /// `ZONES` index of the `topology.kubernetes.io/zone` label, or no label.
    zone: Option<usize>,
}

#[derive(Clone, Debug)]
enum Op {
    SetService(ServiceGen),
    DeleteService(usize, usize),
    SetSlice(SliceGen),
    DeleteSlice(usize, usize),
    SetNodes(Vec<NodeGen>),
    Update,
    /// Keep the current objects picked by the mask (as the same `Arc`s, or as equal copies),
    /// add these, and replace.
    Replace {
        keep: u64,
        copy: bool,
        services: Vec<ServiceGen>,
        slices: Vec<SliceGen>,
        nodes: Option<Vec<NodeGen>>,
    },
}

fn service_gen() -> impl Strategy<Value = ServiceGen> {
    (
        0..NAMESPACES.len(),
        any::<bool>(),
        prop_oneof![9 => 0..4usize, 1 => Just(4)],
        // Mostly one IPv4 address of two and one port, so valid Services often meet on a key.
        prop_oneof![
            5 => prop::collection::vec(0..2usize, 1..=1),
            1 => prop::collection::vec(0..CLUSTER_IPS.len(), 1..=2),
        ],
        prop_oneof![
            4 => prop::collection::vec(0..3usize, 1..=1),
            1 => prop::collection::vec(0..SERVICE_PORTS.len(), 0..=2),
        ],
        prop::bool::weighted(0.3),
        prop::bool::weighted(0.1),
        prop::option::weighted(0.3, 0..TRAFFIC_DISTRIBUTIONS.len()),
        prop_oneof![5 => Just(0usize), 2 => Just(1usize), 2 => Just(2usize)],
    )
        .prop_map(
            |(
                namespace,
                implicit_namespace,
                name,
                ips,
                ports,
                local,
                headless,
                distribution,
                exposure,
            )| {
                ServiceGen {
                    exposure,
                    namespace,
                    implicit_namespace,
                    name,
                    ips,
                    ports,
                    local,
                    headless,
                    traffic_distribution: distribution,
                }
            },
        )
}

/// An endpoint condition: mostly unset (the API's default).
fn condition() -> impl Strategy<Value = Option<bool>> {
    prop_oneof![2 => Just(None), 1 => Just(Some(true)), 1 => Just(Some(false))]
}

fn endpoint_gen() -> impl Strategy<Value = EndpointGen> {
    (
        prop_oneof![6 => 0..3usize, 1 => 3..ENDPOINT_ADDRS.len()],
        condition(),
        condition(),
        condition(),
        prop::option::weighted(0.8, 0..NODES.len()),
        prop::option::of(0..3usize),
        (
            prop::option::of(0..ZONES.len()),
            prop::bool::weighted(0.7),
            // Mostly one zone of the two a Node can be in.
            prop_oneof![
                6 => prop::collection::vec(0..2usize, 1..=1),
                2 => prop::collection::vec(0..ZONES.len(), 1..=2),
                1 => Just(Vec::new()),
            ],
            prop_oneof![
                3 => prop::collection::vec(0..NODES.len(), 1..=1),
                1 => prop::collection::vec(0..NODES.len(), 0..=2),
            ],
        ),
    )
        .prop_map(
            |(
                addr,
                ready,
                serving,
                terminating,
                node,
                pod,
                (zone, hinted, for_zones, for_nodes),
            )| {
                EndpointGen {
                    addr,
                    ready,
                    serving,
                    terminating,
                    node,
                    pod,
                    zone,
                    hinted,
                    for_zones,
                    for_nodes,
                }
            },
        )
}

fn slice_gen() -> impl Strategy<Value = SliceGen> {
    (
        0..NAMESPACES.len(),
        prop_oneof![9 => 0..6usize, 1 => Just(6)],
        prop::option::weighted(0.9, prop_oneof![9 => 0..4usize, 1 => Just(4)]),
        prop_oneof![6 => Just(0usize), 1 => 0..ADDRESS_TYPES.len()],
        prop_oneof![
            3 => Just(vec![0]),
            2 => prop::collection::vec(0..3usize, 1..=1),
            1 => prop::collection::vec(0..SLICE_PORTS.len(), 0..=2),
        ],
        prop::collection::vec(endpoint_gen(), 0..=3),
        prop_oneof![
            3 => Just(HintStyle::None),
            4 => Just(HintStyle::Zones),
            2 => Just(HintStyle::All),
            1 => Just(HintStyle::NodesOnly),
            2 => Just(HintStyle::Some),
        ],
    )
        .prop_map(
            |(namespace, name, owner, address_type, ports, endpoints, hints)| SliceGen {
                namespace,
                name,
                owner,
                address_type,
                ports,
                endpoints,
                hints,
            },
        )
}

/// A valid Service `default/a` or `default/b` (198.19.0.1 or .2, port `http`, policy
/// `Cluster`): with [`topology_slice_gen`], endpoints meet in one frontend often enough for
/// the zone to choose among them.
fn topology_service_gen() -> impl Strategy<Value = ServiceGen> {
    service_gen().prop_map(|mut s| {
        s.namespace = 0;
        s.name %= 2;
        s.ips = vec![s.name];
        s.ports = vec![0];
        s.local = false;
        s.headless = false;
        s.exposure = 0;
        s
    })
}

/// A valid slice for `default/a` or `default/b` (port `http`) with two or three endpoints at
/// valid IPv4 addresses, most of them hinted.
fn topology_slice_gen() -> impl Strategy<Value = SliceGen> {
    (
        slice_gen(),
        0..2usize,
        prop::collection::vec(endpoint_gen(), 2..=3),
        prop_oneof![
            3 => Just(HintStyle::Zones),
            1 => Just(HintStyle::All),
            1 => Just(HintStyle::Some),
        ],
    )
        .prop_map(|(mut s, owner, mut endpoints, hints)| {
            for e in &mut endpoints {
                e.addr %= 3;
            }
            s.namespace = 0;
            s.owner = Some(owner);
            s.address_type = 0;
            s.ports = vec![0];
            s.endpoints = endpoints;
            s.hints = hints;
            s
        })
}

fn node_gen() -> impl Strategy<Value = NodeGen> {
    (
        0..NODES.len(),
        prop::collection::vec(0..3usize, 0..=2),
        prop::option::weighted(0.8, prop_oneof![4 => 0..2usize, 1 => 2..ZONES.len()]),
    )
        .prop_map(|(name, addrs, zone)| NodeGen { name, addrs, zone })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => service_gen().prop_map(Op::SetService),
        2 => topology_service_gen().prop_map(Op::SetService),
        1 => (0..NAMESPACES.len(), 0..SERVICE_NAMES.len()).prop_map(|(n, s)| Op::DeleteService(n, s)),
        8 => slice_gen().prop_map(Op::SetSlice),
        3 => topology_slice_gen().prop_map(Op::SetSlice),
        2 => (0..NAMESPACES.len(), 0..SLICE_NAMES.len()).prop_map(|(n, s)| Op::DeleteSlice(n, s)),
        1 => prop::collection::vec(node_gen(), 0..=2).prop_map(Op::SetNodes),
        // This node alone, in a zone (or none): its zone changes between steps.
        2 => node_gen().prop_map(|mut n| {
            n.name = 0;
            Op::SetNodes(vec![n])
        }),
        5 => Just(Op::Update),
        1 => (
            any::<u64>(),
            any::<bool>(),
            prop::collection::vec(service_gen(), 0..=3),
            prop::collection::vec(slice_gen(), 0..=3),
            prop::option::of(prop::collection::vec(node_gen(), 0..=2)),
        )
            .prop_map(|(keep, copy, services, slices, nodes)| Op::Replace {
                keep,
                copy,
                services,
                slices,
                nodes,
            }),
    ]
}

fn meta(namespace: Option<&str>, name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        namespace: namespace.map(str::to_owned),
        name: (!name.is_empty()).then(|| name.to_owned()),
        labels: (!labels.is_empty()).then(|| {
            labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        }),
        ..ObjectMeta::default()
    }
}

impl ServiceGen {
    fn key(&self) -> (&'static str, &'static str) {
        (NAMESPACES[self.namespace], SERVICE_NAMES[self.name])
    }

    fn build(&self) -> Service {
        let (namespace, name) = self.key();
        let namespace = (!(self.implicit_namespace && namespace == "default")).then_some(namespace);
        let labels: &[(&str, &str)] = if self.headless {
            &[(LABEL_HEADLESS, "")]
        } else {
            &[]
        };
        let ips: Vec<String> = self
            .ips
            .iter()
            .map(|&i| CLUSTER_IPS[i].to_owned())
            .collect();
        Service {
            metadata: meta(namespace, name, labels),
            spec: Some(ServiceSpec {
                cluster_ip: ips.first().cloned(),
                cluster_ips: Some(ips),
                internal_traffic_policy: Some(
                    if self.local { "Local" } else { "Cluster" }.to_owned(),
                ),
                ports: Some(
                    self.ports
                        .iter()
                        .map(|&p| {
                            let (name, port, protocol) = SERVICE_PORTS[p];
                            ServicePort {
                                name: Some(name.to_owned()),
                                port,
                                protocol: Some(protocol.to_owned()),
                                node_port: (self.exposure > 0)
                                    .then(|| 30000 + i32::try_from(p).unwrap_or_default()),
                                ..ServicePort::default()
                            }
                        })
                        .collect(),
                ),
                traffic_distribution: self
                    .traffic_distribution
                    .map(|d| TRAFFIC_DISTRIBUTIONS[d].to_owned()),
                type_: Some(["ClusterIP", "NodePort", "LoadBalancer"][self.exposure].to_owned()),
                external_traffic_policy: (self.exposure == 2).then(|| "Local".to_owned()),
                health_check_node_port: (self.exposure == 2).then_some(32000),
                external_ips: (self.exposure == 2)
                    .then(|| vec!["198.18.100.1".to_owned(), "198.18.7.1".to_owned()]),
                ..ServiceSpec::default()
            }),
            status: (self.exposure == 2).then(|| ServiceStatus {
                load_balancer: Some(LoadBalancerStatus {
                    ingress: Some(vec![LoadBalancerIngress {
                        ip: Some("198.18.8.1".to_owned()),
                        ..LoadBalancerIngress::default()
                    }]),
                }),
                ..ServiceStatus::default()
            }),
        }
    }
}

impl EndpointGen {
    fn hints(&self, style: HintStyle) -> Option<EndpointHints> {
        let for_zones = || {
            let zones = self.for_zones.iter().map(|&z| ForZone {
                name: ZONES[z].to_owned(),
            });
            Some(zones.collect())
        };
        let for_nodes = || {
            let nodes = self.for_nodes.iter().map(|&n| ForNode {
                name: NODES[n].to_owned(),
            });
            Some(nodes.collect())
        };
        match style {
            HintStyle::None => None,
            HintStyle::Some if !self.hinted => None,
            HintStyle::All | HintStyle::Some => Some(EndpointHints {
                for_zones: for_zones(),
                for_nodes: for_nodes(),
            }),
            HintStyle::Zones => Some(EndpointHints {
                for_zones: for_zones(),
                for_nodes: None,
            }),
            HintStyle::NodesOnly => Some(EndpointHints {
                for_zones: None,
                for_nodes: for_nodes(),
            }),
        }
    }
}

impl SliceGen {
    fn key(&self) -> (&'static str, &'static str) {
        (NAMESPACES[self.namespace], SLICE_NAMES[self.name])
    }

    fn build(&self) -> EndpointSlice {
        let (namespace, name) = self.key();
        let owner = self.owner.map(|o| (LABEL_SERVICE_NAME, SERVICE_NAMES[o]));
        EndpointSlice {
            metadata: meta(Some(namespace), name, owner.as_slice()),
            address_type: ADDRESS_TYPES[self.address_type].to_owned(),
            ports: Some(
                self.ports
                    .iter()
                    .map(|&p| {
                        let (name, port, protocol) = SLICE_PORTS[p];
                        EndpointPort {
                            name: Some(name.to_owned()),
                            port: Some(port),
                            protocol: Some(protocol.to_owned()),
                            ..EndpointPort::default()
                        }
                    })
                    .collect(),
            ),
            endpoints: self
                .endpoints
                .iter()
                .map(|e| Endpoint {
                    addresses: vec![ENDPOINT_ADDRS[e.addr].to_owned()],
                    conditions: Some(EndpointConditions {
                        ready: e.ready,
                        serving: e.serving,
                        terminating: e.terminating,
                    }),
                    node_name: e.node.map(|n| NODES[n].to_owned()),
                    target_ref: e.pod.map(|p| ObjectReference {
                        kind: Some("Pod".to_owned()),
                        name: Some(format!("pod-{p}")),
                        ..ObjectReference::default()
                    }),
                    zone: e.zone.map(|z| ZONES[z].to_owned()),
                    hints: e.hints(self.hints),
                    ..Endpoint::default()
                })
                .collect(),
        }
    }
}

impl NodeGen {
    fn build(&self) -> Node {
        let addrs = ["198.18.100.1", "2001:db8:100::1", "not-an-ip"];
        let zone = self.zone.map(|z| (LABEL_TOPOLOGY_ZONE, ZONES[z]));
        Node {
            metadata: meta(None, NODES[self.name], zone.as_slice()),
            status: Some(NodeStatus {
                addresses: Some(
                    self.addrs
                        .iter()
                        .map(|&a| K8sNodeAddress {
                            address: addrs[a].to_owned(),
                            type_: "InternalIP".to_owned(),
                        })
                        .collect(),
                ),
                ..NodeStatus::default()
            }),
            ..Node::default()
        }
    }
}

fn build_nodes(nodes: &[NodeGen]) -> Vec<Arc<Node>> {
    nodes.iter().map(|n| Arc::new(n.build())).collect()
}

/// Keeps the objects whose bit in `keep` is set, as they are or as equal copies.
fn kept<T: Clone>(objects: &[Arc<T>], keep: u64, copy: bool) -> Vec<Arc<T>> {
    objects
        .iter()
        .enumerate()
        .filter(|(i, _)| keep >> (i % 64) & 1 == 1)
        .map(|(_, o)| {
            if copy {
                Arc::new((**o).clone())
            } else {
                Arc::clone(o)
            }
        })
        .collect()
}

fn run(ops: &[Op]) {
    let mut m = Checked::new();
    for op in ops {
        match op {
            Op::SetService(s) => {
                let (namespace, name) = s.key();
                m.service(namespace, name, Some(s.build()));
            }
            Op::DeleteService(namespace, name) => {
                m.service(NAMESPACES[*namespace], SERVICE_NAMES[*name], None);
            }
            Op::SetSlice(s) => {
                let (namespace, name) = s.key();
                m.slice(namespace, name, Some(s.build()));
            }
            Op::DeleteSlice(namespace, name) => {
                m.slice(NAMESPACES[*namespace], SLICE_NAMES[*name], None);
            }
            Op::SetNodes(nodes) => m.nodes(build_nodes(nodes)),
            Op::Update => {
                m.update();
                assert!(
                    m.model.update().is_empty(),
                    "a second update changed something"
                );
                assert_eq!(m.model.recomputed(), 0);
            }
            Op::Replace {
                keep,
                copy,
                services,
                slices,
                nodes,
            } => {
                let mut snapshot = Snapshot {
                    services: kept(&m.objects.services, *keep, *copy),
                    slices: kept(&m.objects.slices, keep.rotate_left(17), *copy),
                    nodes: nodes
                        .as_deref()
                        .map_or_else(|| m.objects.nodes.clone(), build_nodes),
                };
                snapshot
                    .services
                    .extend(services.iter().map(|s| Arc::new(s.build().into())));
                snapshot
                    .slices
                    .extend(slices.iter().map(|s| Arc::new(s.build().into())));
                m.replace(snapshot);
            }
        }
    }
    m.update();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_changes_keep_the_model_equal_to_compute(ops in prop::collection::vec(op(), 1..40)) {
        run(&ops);
    }
}

/// The property test's universe is small enough that conflicts, errors and relabels happen:
/// check that the generated runs do reach them (so the property test can fail on them).
#[test]
fn the_random_changes_reach_conflicts_errors_and_names() {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut conflicts, mut errors, mut names, mut local, mut any) = (0, 0, 0, 0, 0);
    let (mut with_notes, mut unhinted, mut zoned) = (0, 0, 0);
    for _ in 0..200 {
        let ops = prop::collection::vec(op(), 10..30)
            .new_tree(&mut runner)
            .unwrap()
            .current();
        let mut m = Checked::new();
        // Topology is counted on the state after every step (the zone's choices by step), the
        // rest at the end.
        let (mut any_note, mut any_unhinted) = (false, false);
        for op in &ops {
            match op {
                Op::SetService(s) => {
                    let (namespace, name) = s.key();
                    m.service(namespace, name, Some(s.build()));
                }
                Op::SetSlice(s) => {
                    let (namespace, name) = s.key();
                    m.slice(namespace, name, Some(s.build()));
                }
                Op::SetNodes(nodes) => m.nodes(build_nodes(nodes)),
                _ => continue,
            }
            m.update();
            let notes = &m.state().topology_notes;
            any_note |= !notes.is_empty();
            any_unhinted |= notes
                .iter()
                .any(|n| n.why == HintsIgnored::EndpointsWithoutHints);
            // The zone made a difference: without the Nodes' zone labels, other backends.
            let mut unzoned = m.objects.clone();
            for node in &mut unzoned.nodes {
                Arc::make_mut(node).metadata.labels = None;
            }
            zoned += usize::from(compute(&unzoned, NODE).frontends != m.state().frontends);
        }
        m.update();
        with_notes += usize::from(any_note);
        unhinted += usize::from(any_unhinted);
        conflicts += usize::from(!m.model.conflicted.is_empty());
        errors += usize::from(!m.state().errors.is_empty());
        names += usize::from(!m.state().backend_names.is_empty());
        local += usize::from(
            m.state()
                .frontends
                .values()
                .any(|f| f.backends.iter().any(|b| b.local)),
        );
        any += usize::from(m.state().frontends.values().any(|f| !f.backends.is_empty()));
    }
    println!(
        "of 200 runs: {conflicts} with conflicts, {errors} with errors, {names} with backend \
         names, {any} with backends, {local} with local backends, {with_notes} with topology notes \
         ({unhinted} for endpoints without hints); {zoned} steps where the zone chose the backends"
    );
    assert!(conflicts > 40, "{conflicts} runs with conflicts");
    assert!(errors > 40, "{errors} runs with errors");
    assert!(names > 40, "{names} runs with backend names");
    assert!(any > 10, "{any} runs with backends");
    assert!(local > 5, "{local} runs with local backends");
    assert!(with_notes > 20, "{with_notes} runs with topology notes");
    assert!(unhinted > 5, "{unhinted} runs with endpoints without hints");
    assert!(
        zoned > 20,
        "{zoned} steps where the zone chose the backends"
    );
}

// ---------------------------------------------------------------------------------------------
// Timing
// ---------------------------------------------------------------------------------------------

fn scale_service(i: usize) -> Service {
    Service {
        metadata: meta(Some("default"), &format!("svc-{i:05}"), &[]),
        spec: Some(ServiceSpec {
            cluster_ip: Some(format!(
                "10.{}.{}.{}",
                96 + i / 65_536,
                (i / 256) % 256,
                i % 256
            )),
            ports: Some(vec![ServicePort {
                name: Some("http".to_owned()),
                port: 80,
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

fn scale_slice(i: usize, generation: usize) -> EndpointSlice {
    let name = format!("svc-{i:05}");
    EndpointSlice {
        metadata: meta(
            Some("default"),
            &format!("{name}-abcde"),
            &[(LABEL_SERVICE_NAME, &name)],
        ),
        address_type: "IPv4".to_owned(),
        ports: Some(vec![EndpointPort {
            name: Some("http".to_owned()),
            port: Some(8080),
            protocol: Some("TCP".to_owned()),
            ..EndpointPort::default()
        }]),
        endpoints: (0..3)
            .map(|e| {
                let n = i * 3 + e + generation;
                Endpoint {
                    addresses: vec![format!(
                        "172.{}.{}.{}",
                        16 + n / 65_536,
                        (n / 256) % 256,
                        n % 256
                    )],
                    node_name: Some(NODES[e % 2].to_owned()),
                    target_ref: Some(ObjectReference {
                        kind: Some("Pod".to_owned()),
                        name: Some(format!("{name}-pod-{n}")),
                        ..ObjectReference::default()
                    }),
                    ..Endpoint::default()
                }
            })
            .collect(),
    }
}

/// One slice change among 30,000 Services: the incremental model against `compute_with` with
/// a warm memo. `cargo test -p svc-agent --release --lib -- --ignored --nocapture
/// one_slice_change_at_30000_services`.
#[test]
#[ignore = "timing; run in release"]
fn one_slice_change_at_30000_services() {
    const N: usize = 30_000;
    /// Changes timed through the model (spread over the Services); the memo gets fewer.
    const MODEL_ROUNDS: usize = 1_000;
    const MEMO_ROUNDS: usize = 5;
    let slice_name = |i: usize| format!("svc-{i:05}-abcde");
    let mut snapshot = Snapshot {
        services: (0..N).map(|i| Arc::new(scale_service(i).into())).collect(),
        slices: (0..N).map(|i| Arc::new(scale_slice(i, 0).into())).collect(),
        nodes: Vec::new(),
    };

    let started = Instant::now();
    let mut model = Model::new(NODE);
    model.replace(&snapshot);
    let model_build = started.elapsed();

    let mut memo = Memo::default();
    let started = Instant::now();
    let _ = compute_with(&snapshot, NODE, &mut memo);
    let memo_build = started.elapsed();

    // Each round changes one slice (new endpoints, a new object) and times only the model's
    // set_slice + update.
    let (mut model_total, mut model_max) = (Duration::ZERO, Duration::ZERO);
    for round in 0..MODEL_ROUNDS {
        let target = (round * 7_919) % N;
        let slice: Arc<crate::model::Slice> = Arc::new(scale_slice(target, round + 1).into());
        snapshot.slices[target] = Arc::clone(&slice);
        let started = Instant::now();
        model.set_slice("default", &slice_name(target), Some(slice));
        let delta = model.update();
        let took = started.elapsed();
        model_total += took;
        model_max = model_max.max(took);
        assert_eq!(model.recomputed(), 1);
        assert_eq!(delta.frontends.len(), 1);
    }

    let (mut memo_total, mut memo_max) = (Duration::ZERO, Duration::ZERO);
    // The memo has not seen the model's changes yet: bring it up to date first.
    let mut state = compute_with(&snapshot, NODE, &mut memo);
    for round in 0..MEMO_ROUNDS {
        let target = (round * 104_729 + 13) % N;
        snapshot.slices[target] = Arc::new(scale_slice(target, MODEL_ROUNDS + round + 1).into());
        model.set_slice(
            "default",
            &slice_name(target),
            Some(Arc::clone(&snapshot.slices[target])),
        );
        let started = Instant::now();
        state = compute_with(&snapshot, NODE, &mut memo);
        let took = started.elapsed();
        memo_total += took;
        memo_max = memo_max.max(took);
        assert_eq!(memo.recomputed(), 1);
    }
    model.update();
    assert_eq!(model.state(), &state);

    let started = Instant::now();
    let relist = model.replace(&snapshot);
    let model_relist = started.elapsed();
    assert!(relist.is_empty());
    assert_eq!(model.recomputed(), 0);

    let rounds = |n: usize| u32::try_from(n).unwrap();
    println!(
        "{N} Services with 3-endpoint slices, one slice changed:\n  Model set_slice + update: \
         mean {:?}, max {model_max:?} over {MODEL_ROUNDS} changes (first build by replace \
         {model_build:?}; replace with nothing changed {model_relist:?})\n  compute_with, \
         memo warm: mean {:?}, max {memo_max:?} over {MEMO_ROUNDS} changes (first pass \
         {memo_build:?})",
        model_total / rounds(MODEL_ROUNDS),
        memo_total / rounds(MEMO_ROUNDS),
    );
}

#[test]
fn timing_fixtures_are_valid() {
    let snapshot = Snapshot {
        services: (0..300)
            .map(|i| Arc::new(scale_service(i).into()))
            .collect(),
        slices: (0..300)
            .map(|i| Arc::new(scale_slice(i, 0).into()))
            .collect(),
        nodes: Vec::new(),
    };
    let state = compute(&snapshot, NODE);
    assert_eq!(state.errors, []);
    assert_eq!(state.frontends.len(), 300);
    assert!(state.frontends.values().all(|f| f.backends.len() == 3));
    assert_eq!(state.backend_names.len(), 900);
}

#[test]
fn name_counts_are_a_sorted_multiset() {
    let mut c = super::NameCounts::default();
    let (web0, web1): (Arc<str>, Arc<str>) = ("ns/web-0".into(), "ns/web-1".into());
    c.add(&web1);
    c.add(&web0);
    c.add(&web1);
    assert_eq!(c.smallest().map(|n| &**n), Some("ns/web-0"));
    assert!(
        Arc::ptr_eq(c.smallest().unwrap(), &web0),
        "the counts share the listed name"
    );
    c.take("ns/web-0");
    assert_eq!(c.smallest().map(|n| &**n), Some("ns/web-1"));
    c.take("ns/web-1");
    c.take("ns/other");
    assert!(!c.is_empty(), "web-1 was listed twice");
    c.take("ns/web-1");
    assert!(c.is_empty());
}
