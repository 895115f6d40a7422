//! Tests of [`compute`](super::compute), with objects in `kubectl get -o yaml` shape.

use std::{collections::HashMap, fmt::Write as _, net::SocketAddr};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

use super::{test_support::yaml, *};

// ---------------------------------------------------------------------------------------------
// Fixtures and helpers
// ---------------------------------------------------------------------------------------------

/// The documentation example: a Service with a named targetPort, as `kubectl get -o yaml`
/// prints it.
const FRONTEND_SVC: &str = r#"
apiVersion: v1
kind: Service
metadata:
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: |
      {"apiVersion":"v1","kind":"Service","metadata":{"annotations":{},"name":"frontend-svc","namespace":"default"},"spec":{"ports":[{"name":"http","port":80,"targetPort":"http"}],"selector":{"app":"frontend"}}}
  creationTimestamp: "2025-05-01T10:00:00Z"
  name: frontend-svc
  namespace: default
  resourceVersion: "1051"
  uid: 0a4e8f7c-3b5d-4d8e-9f1a-2c3b4d5e6f70
spec:
  clusterIP: 198.19.0.10
  clusterIPs:
  - 198.19.0.10
  internalTrafficPolicy: Cluster
  ipFamilies:
  - IPv4
  ipFamilyPolicy: SingleStack
  ports:
  - name: http
    port: 80
    protocol: TCP
    targetPort: 5000
  selector:
    app: frontend
  sessionAffinity: None
  type: ClusterIP
status:
  loadBalancer: {}
"#;

/// Its `EndpointSlice`, as the `EndpointSlice` controller writes it.
const FRONTEND_SLICE: &str = r#"
addressType: IPv4
apiVersion: discovery.k8s.io/v1
endpoints:
- addresses:
  - 198.18.1.10
  conditions:
    ready: true
    serving: true
    terminating: false
  nodeName: node1
  targetRef:
    kind: Pod
    name: frontend-7d9c5b7f6-abcde
    namespace: default
    uid: 11111111-2222-3333-4444-555555555555
  zone: zone-a
- addresses:
  - 198.18.1.11
  conditions:
    ready: true
    serving: true
    terminating: false
  nodeName: node1
  targetRef:
    kind: Pod
    name: frontend-7d9c5b7f6-fghij
    namespace: default
    uid: 11111111-2222-3333-4444-666666666666
  zone: zone-a
- addresses:
  - 198.18.2.10
  conditions:
    ready: true
    serving: true
    terminating: false
  nodeName: node2
  targetRef:
    kind: Pod
    name: frontend-7d9c5b7f6-klmno
    namespace: default
    uid: 11111111-2222-3333-4444-777777777777
  zone: zone-b
kind: EndpointSlice
metadata:
  annotations:
    endpoints.kubernetes.io/last-change-trigger-time: "2025-05-01T10:00:05Z"
  creationTimestamp: "2025-05-01T10:00:00Z"
  generateName: frontend-svc-
  generation: 4
  labels:
    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
    kubernetes.io/service-name: frontend-svc
  name: frontend-svc-abc12
  namespace: default
  ownerReferences:
  - apiVersion: v1
    blockOwnerDeletion: true
    controller: true
    kind: Service
    name: frontend-svc
    uid: 0a4e8f7c-3b5d-4d8e-9f1a-2c3b4d5e6f70
  resourceVersion: "1060"
  uid: 9f8e7d6c-5b4a-4321-8765-0fedcba98765
ports:
- name: http
  port: 5000
  protocol: TCP
"#;

const NODE1: &str = r"
apiVersion: v1
kind: Node
metadata:
  name: node1
status:
  addresses:
  - address: 198.18.100.11
    type: InternalIP
  - address: node1
    type: Hostname
";

/// A compact Service in namespace `default`: `spec` is the YAML body of `spec:` (indented by
/// two spaces), `extra_metadata` extra lines under `metadata:`.
fn service(name: &str, extra_metadata: &str, spec: &str) -> Service {
    yaml(&format!(
        r"
apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: default
{extra_metadata}spec:
{spec}"
    ))
}

/// A compact `EndpointSlice` in namespace `default` for Service `svc`; `body` holds
/// `addressType`, `ports` and `endpoints` at top level.
pub(super) fn slice(name: &str, svc: &str, body: &str) -> EndpointSlice {
    yaml(&format!(
        r"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}
  namespace: default
  labels:
    kubernetes.io/service-name: {svc}
{body}"
    ))
}

fn snapshot(services: Vec<Service>, slices: Vec<EndpointSlice>) -> Snapshot {
    Snapshot::new(services, slices, Vec::new())
}

fn key(addr: &str, port: u16, proto: Protocol) -> FrontendKey {
    FrontendKey {
        addr: addr.parse().unwrap(),
        port,
        proto,
        scope: Scope::Internal,
    }
}

fn tcp(addr: &str, port: u16) -> FrontendKey {
    key(addr, port, Protocol::Tcp)
}

/// A remote, non-terminating backend from `"addr:port"` (IPv6 in brackets).
fn b(addr: &str) -> Backend {
    let sa: SocketAddr = addr.parse().unwrap();
    Backend {
        addr: sa.ip(),
        port: sa.port(),
        local: false,
        terminating: false,
    }
}

fn local(backend: Backend) -> Backend {
    Backend {
        local: true,
        ..backend
    }
}

fn terminating(backend: Backend) -> Backend {
    Backend {
        terminating: true,
        ..backend
    }
}

/// The frontend at `key`, failing the test with the whole state when there is none.
fn frontend<'s>(state: &'s DesiredState, key: &FrontendKey) -> &'s Frontend {
    match state.frontends.get(key) {
        Some(f) => f,
        None => panic!("no frontend {key} in {state:#?}"),
    }
}

fn fields(state: &DesiredState) -> Vec<(&'static str, &str, &str)> {
    state
        .errors
        .iter()
        .map(|e| (e.kind, e.name.as_str(), e.field.as_str()))
        .collect()
}

/// Computes with every rotation and the reversal of the objects, checks all give the same
/// result, and returns it.
fn compute_any_order(snapshot: &Snapshot, node: &str) -> DesiredState {
    let expected = compute(snapshot, node);
    let n = snapshot.services.len().max(snapshot.slices.len()).max(1);
    for shift in 0..n {
        for reverse in [false, true] {
            let mut other = snapshot.clone();
            if !other.services.is_empty() {
                let k = shift % other.services.len();
                other.services.rotate_left(k);
            }
            if !other.slices.is_empty() {
                let k = shift % other.slices.len();
                other.slices.rotate_right(k);
            }
            if reverse {
                other.services.reverse();
                other.slices.reverse();
                other.nodes.reverse();
            }
            assert_eq!(
                compute(&other, node),
                expected,
                "shift {shift} reverse {reverse}"
            );
        }
    }
    expected
}

/// A simple web Service with one port `http` 80 and the given `extra` spec lines.
pub(super) fn web(name: &str, ip: &str, extra: &str) -> Service {
    service(
        name,
        "",
        &format!(
            r"
  clusterIP: {ip}
  ports:
  - name: http
    port: 80
    protocol: TCP
    targetPort: http
{extra}"
        ),
    )
}

/// An IPv4 slice for `svc` with port `http` = `port` and `endpoints` (YAML list items).
fn web_slice(name: &str, svc: &str, port: u16, endpoints: &str) -> EndpointSlice {
    slice(
        name,
        svc,
        &format!(
            r"
addressType: IPv4
ports:
- name: http
  port: {port}
  protocol: TCP
endpoints:
{endpoints}"
        ),
    )
}

/// One endpoint list item with the given conditions.
fn ep(addr: &str, node: &str, ready: bool, serving: bool, term: bool) -> String {
    format!(
        r"
- addresses:
  - {addr}
  conditions:
    ready: {ready}
    serving: {serving}
    terminating: {term}
  nodeName: {node}
"
    )
}

fn ready(addr: &str, node: &str) -> String {
    ep(addr, node, true, true, false)
}

// ---------------------------------------------------------------------------------------------
// The basic case
// ---------------------------------------------------------------------------------------------

#[test]
fn documentation_example_gives_one_frontend_with_three_backends() {
    let snap = Snapshot::new(
        vec![yaml(FRONTEND_SVC)],
        vec![yaml(FRONTEND_SLICE)],
        vec![yaml(NODE1)],
    );
    let state = compute_any_order(&snap, "node1");
    assert_eq!(state.errors, []);
    assert_eq!(state.frontends.len(), 1);
    let f = frontend(&state, &tcp("198.19.0.10", 80));
    assert_eq!(
        f,
        &Frontend {
            kind: crate::model::FrontendKind::ClusterIp,
            source_ranges: Vec::new(),
            service: ServicePortRef {
                namespace: "default".into(),
                name: "frontend-svc".into(),
                port_name: "http".into(),
            },
            affinity_timeout: None,
            local_only: false,
            backends: vec![
                local(b("198.18.1.10:5000")),
                local(b("198.18.1.11:5000")),
                b("198.18.2.10:5000"),
            ],
            kept_backends: vec![],
            unready_backends: vec![],
            on_empty: EmptyAction::Reject,
        }
    );
    assert_eq!(
        state.node_addresses,
        [NodeAddress {
            addr: "198.18.100.11".parse().unwrap(),
            kind: NodeAddressKind::InternalIp,
        }]
    );
    // Who is behind each address, from the endpoints' targetRef.
    let names: Vec<String> = state
        .backend_names
        .iter()
        .map(|(addr, name)| format!("{addr} {name}"))
        .collect();
    assert_eq!(
        names,
        [
            "198.18.1.10 default/frontend-7d9c5b7f6-abcde",
            "198.18.1.11 default/frontend-7d9c5b7f6-fghij",
            "198.18.2.10 default/frontend-7d9c5b7f6-klmno",
        ]
    );
}

#[test]
fn local_flag_follows_this_nodes_name() {
    let snap = snapshot(vec![yaml(FRONTEND_SVC)], vec![yaml(FRONTEND_SLICE)]);
    let on_node2 = compute(&snap, "node2");
    assert_eq!(
        frontend(&on_node2, &tcp("198.19.0.10", 80)).backends,
        [
            b("198.18.1.10:5000"),
            b("198.18.1.11:5000"),
            local(b("198.18.2.10:5000")),
        ]
    );
    // An empty node name matches no endpoint, not even one with an empty nodeName.
    let nameless = compute(&snap, "");
    assert!(
        frontend(&nameless, &tcp("198.19.0.10", 80))
            .backends
            .iter()
            .all(|b| !b.local)
    );
}

#[test]
fn service_without_slices_rejects() {
    let state = compute_any_order(&snapshot(vec![yaml(FRONTEND_SVC)], vec![]), "node1");
    let f = frontend(&state, &tcp("198.19.0.10", 80));
    assert_eq!(f.backends, []);
    assert_eq!(f.kept_backends, []);
    assert_eq!(f.on_empty, EmptyAction::Reject);
}

#[test]
fn slices_without_service_give_nothing() {
    let state = compute_any_order(&snapshot(vec![], vec![yaml(FRONTEND_SLICE)]), "node1");
    assert_eq!(state, DesiredState::default());
}

#[test]
fn empty_snapshot_gives_empty_state() {
    assert_eq!(
        compute(&Snapshot::default(), "node1"),
        DesiredState::default()
    );
}

// ---------------------------------------------------------------------------------------------
// Ports and protocols
// ---------------------------------------------------------------------------------------------

#[test]
fn multiport_service_resolves_each_port_by_name() {
    let svc = service(
        "multi",
        "",
        r"
  clusterIP: 198.19.0.30
  ports:
  - name: http
    port: 80
    protocol: TCP
    targetPort: web
  - name: metrics
    port: 9090
    protocol: TCP
    targetPort: 9100
",
    );
    let sl = slice(
        "multi-1",
        "multi",
        r"
addressType: IPv4
ports:
- name: metrics
  port: 9100
  protocol: TCP
- name: http
  port: 8080
  protocol: TCP
endpoints:
- addresses:
  - 198.18.1.5
  conditions:
    ready: true
  nodeName: node1
",
    );
    let state = compute_any_order(&snapshot(vec![svc], vec![sl]), "node9");
    assert_eq!(state.errors, []);
    assert_eq!(
        frontend(&state, &tcp("198.19.0.30", 80)).backends,
        [b("198.18.1.5:8080")]
    );
    let metrics = frontend(&state, &tcp("198.19.0.30", 9090));
    assert_eq!(metrics.backends, [b("198.18.1.5:9100")]);
    assert_eq!(metrics.service.port_name.as_ref(), "metrics");
}

#[test]
fn same_port_with_two_protocols_gives_two_frontends() {
    let svc = service(
        "kube-dns",
        "",
        r"
  clusterIP: 198.19.0.10
  ports:
  - name: dns
    port: 53
    protocol: UDP
    targetPort: 53
  - name: dns-tcp
    port: 53
    protocol: TCP
    targetPort: 53
",
    );
    let sl = slice(
        "kube-dns-x1",
        "kube-dns",
        r"
addressType: IPv4
ports:
- name: dns-tcp
  port: 53
  protocol: TCP
- name: dns
  port: 53
  protocol: UDP
endpoints:
- addresses:
  - 198.18.0.2
  conditions:
    ready: true
",
    );
    let state = compute_any_order(&snapshot(vec![svc], vec![sl]), "node1");
    assert_eq!(state.errors, []);
    assert_eq!(state.frontends.len(), 2);
    let udp = frontend(&state, &key("198.19.0.10", 53, Protocol::Udp));
    assert_eq!(udp.backends, [b("198.18.0.2:53")]);
    assert_eq!(udp.service.port_name.as_ref(), "dns");
    let tcp_f = frontend(&state, &tcp("198.19.0.10", 53));
    assert_eq!(tcp_f.service.port_name.as_ref(), "dns-tcp");
}

#[test]
fn protocol_defaults_to_tcp_and_unnamed_ports_match() {
    // `kubectl create service` style: no port name, no protocol; the controller writes the
    // slice port with `name: ""`.
    let svc = service(
        "plain",
        "",
        r"
  clusterIP: 198.19.0.40
  ports:
  - port: 8080
",
    );
    let sl = slice(
        "plain-1",
        "plain",
        r#"
addressType: IPv4
ports:
- name: ""
  port: 8080
endpoints:
- addresses:
  - 198.18.2.2
"#,
    );
    let state = compute_any_order(&snapshot(vec![svc], vec![sl]), "node1");
    assert_eq!(state.errors, []);
    let f = frontend(&state, &tcp("198.19.0.40", 8080));
    assert_eq!(f.backends, [b("198.18.2.2:8080")]);
    assert_eq!(f.service.port_name.as_ref(), "");
}

#[test]
fn sctp_is_accepted() {
    let svc = service(
        "sig",
        "",
        r"
  clusterIP: 198.19.0.41
  ports:
  - name: sig
    port: 3868
    protocol: SCTP
",
    );
    let sl = slice(
        "sig-1",
        "sig",
        r"
addressType: IPv4
ports:
- name: sig
  port: 3868
  protocol: SCTP
endpoints:
- addresses:
  - 198.18.2.3
",
    );
    let state = compute_any_order(&snapshot(vec![svc], vec![sl]), "node1");
    assert_eq!(
        frontend(&state, &key("198.19.0.41", 3868, Protocol::Sctp)).backends,
        [b("198.18.2.3:3868")]
    );
}

#[test]
fn slice_port_must_match_name_and_protocol() {
    let svc = web("web", "198.19.0.42", "");
    let wrong_name = slice(
        "web-a",
        "web",
        r"
addressType: IPv4
ports:
- name: https
  port: 8443
endpoints:
- addresses:
  - 198.18.3.1
",
    );
    let wrong_proto = slice(
        "web-b",
        "web",
        r"
addressType: IPv4
ports:
- name: http
  port: 8080
  protocol: UDP
endpoints:
- addresses:
  - 198.18.3.2
",
    );
    let state = compute_any_order(&snapshot(vec![svc], vec![wrong_name, wrong_proto]), "node1");
    assert_eq!(state.errors, []);
    let f = frontend(&state, &tcp("198.19.0.42", 80));
    assert_eq!(f.backends, []);
    assert_eq!(f.on_empty, EmptyAction::Reject);
}

#[test]
fn slice_port_without_number_is_skipped_without_error() {
    let svc = web("web", "198.19.0.43", "");
    let all_ports = slice(
        "web-a",
        "web",
        r"
addressType: IPv4
ports:
- name: http
endpoints:
- addresses:
  - 198.18.3.1
",
    );
    let state = compute_any_order(&snapshot(vec![svc], vec![all_ports]), "node1");
    assert_eq!(state.errors, []);
    assert_eq!(frontend(&state, &tcp("198.19.0.43", 80)).backends, []);
}

#[test]
fn service_without_ports_has_no_frontend() {
    let svc = service("noports", "", "  clusterIP: 198.19.0.44\n");
    let state = compute_any_order(&snapshot(vec![svc], vec![]), "node1");
    assert_eq!(state, DesiredState::default());
}

// ---------------------------------------------------------------------------------------------
// Slices: linking, families, duplicates
// ---------------------------------------------------------------------------------------------

#[test]
fn named_target_port_resolves_per_slice() {
    // During a rollout the new pods name port `http` 8081, the old ones 8080.
    let svc = web("web", "198.19.0.50", "");
    let old = web_slice("web-old", "web", 8080, &ready("198.18.1.1", "node1"));
    let new = web_slice("web-new", "web", 8081, &ready("198.18.2.1", "node2"));
    let state = compute_any_order(&snapshot(vec![svc], vec![old, new]), "node1");
    assert_eq!(
        frontend(&state, &tcp("198.19.0.50", 80)).backends,
        [local(b("198.18.1.1:8080")), b("198.18.2.1:8081")]
    );
}

#[test]
fn same_address_with_two_ports_is_two_backends() {
    let svc = web("web", "198.19.0.51", "");
    let a = web_slice("web-a", "web", 8080, &ready("198.18.1.1", "node1"));
    let b2 = web_slice("web-b", "web", 8081, &ready("198.18.1.1", "node1"));
    let state = compute_any_order(&snapshot(vec![svc], vec![a, b2]), "node2");
    assert_eq!(
        frontend(&state, &tcp("198.19.0.51", 80)).backends,
        [b("198.18.1.1:8080"), b("198.18.1.1:8081")]
    );
}

#[test]
fn duplicate_endpoint_across_slices_is_deduplicated() {
    let svc = web("web", "198.19.0.52", "");
    let a = web_slice(
        "web-a",
        "web",
        8080,
        &(ready("198.18.1.1", "node1") + &ready("198.18.1.2", "node1")),
    );
    let dup = web_slice("web-b", "web", 8080, &ready("198.18.1.1", "node1"));
    let state = compute_any_order(&snapshot(vec![svc], vec![a, dup]), "node1");
    assert_eq!(
        frontend(&state, &tcp("198.19.0.52", 80)).backends,
        [local(b("198.18.1.1:8080")), local(b("198.18.1.2:8080"))]
    );
}

#[test]
fn duplicate_endpoint_with_different_conditions_prefers_the_usable_copy() {
    // The controller moved a now-ready endpoint to another slice; the stale copy says not
    // ready. Whatever the order, the ready copy wins.
    let svc = web("web", "198.19.0.53", "");
    let old_copy = web_slice(
        "web-a",
        "web",
        8080,
        &ep("198.18.1.1", "node1", false, false, false),
    );
    let fresh = web_slice("web-b", "web", 8080, &ready("198.18.1.1", "node1"));
    let state = compute_any_order(&snapshot(vec![svc], vec![old_copy, fresh]), "node2");
    let f = frontend(&state, &tcp("198.19.0.53", 80));
    assert_eq!(f.backends, [b("198.18.1.1:8080")]);
    assert_eq!(f.kept_backends, []);
}

#[test]
fn slices_link_by_label_and_namespace_only() {
    let svc = web("web", "198.19.0.54", "");
    let other_ns: EndpointSlice = yaml(
        r"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-x
  namespace: other
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
- name: http
  port: 8080
endpoints:
- addresses:
  - 198.18.9.1
",
    );
    let unlabelled: EndpointSlice = yaml(
        r"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web
  namespace: default
addressType: IPv4
ports:
- name: http
  port: 8080
endpoints:
- addresses:
  - 198.18.9.2
",
    );
    let good = web_slice("web-y", "web", 8080, &ready("198.18.9.3", "node2"));
    let state = compute_any_order(&snapshot(vec![svc], vec![other_ns, unlabelled, good]), "n");
    assert_eq!(state.errors, []);
    assert_eq!(
        frontend(&state, &tcp("198.19.0.54", 80)).backends,
        [b("198.18.9.3:8080")]
    );
}

#[test]
fn objects_without_namespace_are_in_default() {
    let svc: Service = yaml(
        r"
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  clusterIP: 198.19.0.55
  ports:
  - name: http
    port: 80
",
    );
    let sl: EndpointSlice = yaml(
        r"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
- name: http
  port: 8080
endpoints:
- addresses:
  - 198.18.9.4
",
    );
    let state = compute_any_order(&snapshot(vec![svc], vec![sl]), "n");
    let f = frontend(&state, &tcp("198.19.0.55", 80));
    assert_eq!(f.service.namespace.as_ref(), "default");
    assert_eq!(f.backends, [b("198.18.9.4:8080")]);
}

#[test]
fn dual_stack_service_gets_a_frontend_per_family_with_that_familys_endpoints() {
    let svc: Service = yaml(
        r"
apiVersion: v1
kind: Service
metadata:
  name: dual
  namespace: default
spec:
  clusterIP: 198.19.0.60
  clusterIPs:
  - 198.19.0.60
  - 2001:db8:f::60
  internalTrafficPolicy: Cluster
  ipFamilies:
  - IPv4
  - IPv6
  ipFamilyPolicy: PreferDualStack
  ports:
  - name: http
    port: 80
    protocol: TCP
    targetPort: 8080
  selector:
    app: dual
  sessionAffinity: None
  type: ClusterIP
",
    );
    let v4 = web_slice("dual-v4", "dual", 8080, &ready("198.18.1.7", "node1"));
    let v6: EndpointSlice = yaml(
        r"
addressType: IPv6
apiVersion: discovery.k8s.io/v1
endpoints:
- addresses:
  - 2001:db8:1::7
  conditions:
    ready: true
    serving: true
    terminating: false
  nodeName: node1
kind: EndpointSlice
metadata:
  labels:
    kubernetes.io/service-name: dual
  name: dual-v6
  namespace: default
ports:
- name: http
  port: 8080
  protocol: TCP
",
    );
    let state = compute_any_order(&snapshot(vec![svc], vec![v4, v6]), "node1");
    assert_eq!(state.errors, []);
    assert_eq!(state.frontends.len(), 2);
    assert_eq!(
        frontend(&state, &tcp("198.19.0.60", 80)).backends,
        [local(b("198.18.1.7:8080"))]
    );
    assert_eq!(
        frontend(&state, &tcp("2001:db8:f::60", 80)).backends,
        [local(b("[2001:db8:1::7]:8080"))]
    );
}

#[test]
fn ipv6_slice_does_not_serve_ipv4_frontend_and_fqdn_slices_are_ignored() {
    let svc = web("web", "198.19.0.61", "");
    let v6 = slice(
        "web-v6",
        "web",
        r"
addressType: IPv6
ports:
- name: http
  port: 8080
endpoints:
- addresses:
  - 2001:db8::1
",
    );
    let fqdn = slice(
        "web-fqdn",
        "web",
        r"
addressType: FQDN
ports:
- name: http
  port: 8080
endpoints:
- addresses:
  - web.example.com
",
    );
    let state = compute_any_order(&snapshot(vec![svc], vec![v6, fqdn]), "node1");
    assert_eq!(state.errors, []);
    assert_eq!(frontend(&state, &tcp("198.19.0.61", 80)).backends, []);
}

#[test]
fn only_the_first_address_of_an_endpoint_is_used() {
    let svc = web("web", "198.19.0.62", "");
    let sl = slice(
        "web-1",
        "web",
        r"
addressType: IPv4
ports:
- name: http
  port: 8080
endpoints:
- addresses:
  - 198.18.1.1
  - 198.18.1.2
  - not-an-ip
",
    );
    let state = compute_any_order(&snapshot(vec![svc], vec![sl]), "node1");
    assert_eq!(state.errors, []);
    assert_eq!(
        frontend(&state, &tcp("198.19.0.62", 80)).backends,
        [b("198.18.1.1:8080")]
    );
}

#[test]
fn ip_families_decide_which_cluster_ips_are_served() {
    let svc = |name: &str, families: &str| {
        service(
            name,
            "",
            &format!(
                r"
  clusterIPs:
  - 198.19.0.64
  - 2001:db8:f::64
{families}
  ports:
  - name: http
    port: 80
"
            ),
        )
    };
    let served = |svc: Service| {
        let state = compute(&snapshot(vec![svc], vec![]), "node1");
        assert_eq!(state.errors, []);
        let v4 = state.frontends.contains_key(&tcp("198.19.0.64", 80));
        let v6 = state.frontends.contains_key(&tcp("2001:db8:f::64", 80));
        (v4, v6)
    };
    // No list: every clusterIP, as before dual-stack.
    assert_eq!(served(svc("web", "")), (true, true));
    assert_eq!(
        served(svc("web", "  ipFamilies: []")),
        (true, true),
        "an empty list is no list"
    );
    assert_eq!(
        served(svc("web", "  ipFamilies:\n  - IPv6\n  - IPv4")),
        (true, true)
    );
    // Only the listed families (kube-proxy's GetClusterIPByFamily).
    assert_eq!(served(svc("web", "  ipFamilies:\n  - IPv4")), (true, false));
    assert_eq!(served(svc("web", "  ipFamilies:\n  - IPv6")), (false, true));
}

#[test]
fn an_unknown_ip_family_is_an_error() {
    let errors = errors_of_bad_service(service(
        "bad",
        "",
        r"
  clusterIP: 198.19.0.65
  ipFamilies:
  - IPv5
  ports:
  - port: 80
",
    ));
    assert_eq!(only_field(&errors), "spec.ipFamilies[0]");
}

#[test]
fn cluster_ip_is_used_when_cluster_ips_is_absent() {
    let state = compute(&snapshot(vec![web("web", "198.19.0.63", "")], vec![]), "n");
    assert!(state.frontends.contains_key(&tcp("198.19.0.63", 80)));
}

// ---------------------------------------------------------------------------------------------
// Endpoint conditions and graceful termination
// ---------------------------------------------------------------------------------------------

#[test]
fn missing_conditions_mean_ready() {
    let svc = web("web", "198.19.0.70", "");
    let sl = slice(
        "web-1",
        "web",
        r"
addressType: IPv4
ports:
- name: http
  port: 8080
endpoints:
- addresses:
  - 198.18.1.1
- addresses:
  - 198.18.1.2
  conditions: {}
",
    );
    let state = compute_any_order(&snapshot(vec![svc], vec![sl]), "node1");
    assert_eq!(
        frontend(&state, &tcp("198.19.0.70", 80)).backends,
        [b("198.18.1.1:8080"), b("198.18.1.2:8080")]
    );
}

#[test]
fn terminating_endpoints_keep_connections_while_ready_ones_take_new_ones() {
    let svc = web("web", "198.19.0.71", "");
    let endpoints = ready("198.18.1.1", "node1")
        + &ep("198.18.1.2", "node1", false, true, true)
        + &ep("198.18.1.3", "node2", false, false, true);
    let sl = web_slice("web-1", "web", 8080, &endpoints);
    let state = compute_any_order(&snapshot(vec![svc], vec![sl]), "node1");
    let f = frontend(&state, &tcp("198.19.0.71", 80));
    assert_eq!(f.backends, [local(b("198.18.1.1:8080"))]);
    assert_eq!(
        f.kept_backends,
        [
            local(terminating(b("198.18.1.2:8080"))),
            terminating(b("198.18.1.3:8080")),
        ]
    );
}

#[test]
fn without_ready_endpoints_serving_terminating_ones_take_new_connections() {
    let svc = web("web", "198.19.0.72", "");
    let endpoints = ep("198.18.1.2", "node1", false, true, true)
        + &ep("198.18.2.2", "node2", false, true, true)
        + &ep("198.18.2.3", "node2", false, false, true)
        + &ep("198.18.2.4", "node2", false, false, false);
    let sl = web_slice("web-1", "web", 8080, &endpoints);
    let state = compute_any_order(&snapshot(vec![svc], vec![sl]), "node1");
    let f = frontend(&state, &tcp("198.19.0.72", 80));
    assert_eq!(
        f.backends,
        [
            local(terminating(b("198.18.1.2:8080"))),
            terminating(b("198.18.2.2:8080")),
        ]
    );
    // Terminating but no longer serving: existing connections only. Neither: established TCP
    // connections only (UDP flows are cleared).
    assert_eq!(f.kept_backends, [terminating(b("198.18.2.3:8080"))]);
    assert_eq!(f.unready_backends, [b("198.18.2.4:8080")]);
}

#[test]
fn only_non_serving_endpoints_means_reject() {
    let svc = web("web", "198.19.0.73", "");
    let endpoints = ep("198.18.1.2", "node1", false, false, true)
        + &ep("198.18.1.3", "node1", false, false, false);
    let sl = web_slice("web-1", "web", 8080, &endpoints);
    let state = compute_any_order(&snapshot(vec![svc], vec![sl]), "node1");
    let f = frontend(&state, &tcp("198.19.0.73", 80));
    assert_eq!(f.backends, []);
    assert_eq!(f.kept_backends, [local(terminating(b("198.18.1.2:8080")))]);
    assert_eq!(f.on_empty, EmptyAction::Reject);
}

#[test]
fn not_ready_endpoint_with_unset_serving_keeps_connections_only() {
    // `serving` nil is "true" (API docs, kube-proxy); not ready and not terminating: no new
    // connections, established ones are left alone.
    let svc = web("web", "198.19.0.74", "");
    let sl = slice(
        "web-1",
        "web",
        r"
addressType: IPv4
ports:
- name: http
  port: 8080
endpoints:
- addresses:
  - 198.18.1.1
  conditions:
    ready: false
",
    );
    let state = compute_any_order(&snapshot(vec![svc], vec![sl]), "node1");
    let f = frontend(&state, &tcp("198.19.0.74", 80));
    assert_eq!(f.backends, []);
    assert_eq!(f.kept_backends, [b("198.18.1.1:8080")]);
    assert_eq!(f.on_empty, EmptyAction::Reject);
}

// ---------------------------------------------------------------------------------------------
// internalTrafficPolicy
// ---------------------------------------------------------------------------------------------

fn local_policy_service() -> Service {
    web("web", "198.19.0.80", "  internalTrafficPolicy: Local\n")
}

#[test]
fn internal_traffic_policy_local_uses_local_endpoints_only() {
    let endpoints = ready("198.18.1.1", "node1") + &ready("198.18.2.1", "node2");
    let sl = web_slice("web-1", "web", 8080, &endpoints);
    let state = compute_any_order(&snapshot(vec![local_policy_service()], vec![sl]), "node1");
    let f = frontend(&state, &tcp("198.19.0.80", 80));
    assert_eq!(f.backends, [local(b("198.18.1.1:8080"))]);
    assert_eq!(f.kept_backends, [b("198.18.2.1:8080")]);
    assert!(
        f.local_only,
        "internalTrafficPolicy Local must reach the datapath"
    );
    assert_eq!(
        f.on_empty,
        EmptyAction::Drop(DropReason::InternalTrafficPolicyLocal)
    );
}

#[test]
fn internal_traffic_policy_local_without_local_endpoint_drops() {
    let endpoints = ready("198.18.2.1", "node2") + &ready("198.18.3.1", "node3");
    let sl = web_slice("web-1", "web", 8080, &endpoints);
    let state = compute_any_order(&snapshot(vec![local_policy_service()], vec![sl]), "node1");
    let f = frontend(&state, &tcp("198.19.0.80", 80));
    assert_eq!(f.backends, []);
    assert_eq!(
        f.kept_backends,
        [b("198.18.2.1:8080"), b("198.18.3.1:8080")]
    );
    assert_eq!(
        f.on_empty,
        EmptyAction::Drop(DropReason::InternalTrafficPolicyLocal)
    );
}

#[test]
fn internal_traffic_policy_local_without_any_endpoint_rejects() {
    // kube-proxy: "no endpoints at all" wins over "no local endpoint".
    let state = compute_any_order(&snapshot(vec![local_policy_service()], vec![]), "node1");
    assert_eq!(
        frontend(&state, &tcp("198.19.0.80", 80)).on_empty,
        EmptyAction::Reject
    );
}

#[test]
fn internal_traffic_policy_local_falls_back_to_local_terminating_endpoints() {
    // A remote ready endpoint does not stop the local fallback.
    let endpoints = ep("198.18.1.1", "node1", false, true, true) + &ready("198.18.2.1", "node2");
    let sl = web_slice("web-1", "web", 8080, &endpoints);
    let state = compute_any_order(&snapshot(vec![local_policy_service()], vec![sl]), "node1");
    let f = frontend(&state, &tcp("198.19.0.80", 80));
    assert_eq!(f.backends, [local(terminating(b("198.18.1.1:8080")))]);
    assert_eq!(f.kept_backends, [b("198.18.2.1:8080")]);
}

#[test]
fn internal_traffic_policy_local_prefers_local_ready_over_local_terminating() {
    let endpoints = ep("198.18.1.1", "node1", false, true, true) + &ready("198.18.1.2", "node1");
    let sl = web_slice("web-1", "web", 8080, &endpoints);
    let state = compute_any_order(&snapshot(vec![local_policy_service()], vec![sl]), "node1");
    let f = frontend(&state, &tcp("198.19.0.80", 80));
    assert_eq!(f.backends, [local(b("198.18.1.2:8080"))]);
    assert_eq!(f.kept_backends, [local(terminating(b("198.18.1.1:8080")))]);
}

#[test]
fn internal_traffic_policy_cluster_is_the_default_and_uses_all_endpoints() {
    let endpoints = ready("198.18.1.1", "node1") + &ready("198.18.2.1", "node2");
    let explicit = web(
        "explicit",
        "198.19.0.81",
        "  internalTrafficPolicy: Cluster\n",
    );
    let slices = vec![
        web_slice("web-1", "web", 8080, &endpoints),
        web_slice("explicit-1", "explicit", 8080, &endpoints),
    ];
    let state = compute_any_order(
        &snapshot(vec![web("web", "198.19.0.82", ""), explicit], slices),
        "node1",
    );
    for vip in ["198.19.0.81", "198.19.0.82"] {
        let f = frontend(&state, &tcp(vip, 80));
        assert_eq!(
            f.backends,
            [local(b("198.18.1.1:8080")), b("198.18.2.1:8080")]
        );
        assert_eq!(f.on_empty, EmptyAction::Reject);
    }
}

// ---------------------------------------------------------------------------------------------
// Topology-aware routing (hints)
// ---------------------------------------------------------------------------------------------

/// A Node `name` with the zone label `zone` (none when `None`).
fn zoned_node(name: &str, zone: Option<&str>) -> Node {
    let labels = zone.map_or(String::new(), |z| {
        format!("  labels:\n    topology.kubernetes.io/zone: {z}\n")
    });
    yaml(&format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n{labels}"
    ))
}

/// One endpoint list item with `ready` (serving, not terminating, or serving and terminating
/// when not ready), `hints.forZones` = `zones` and `hints.forNodes` = `nodes` (no `hints` when
/// both are empty).
fn hinted(addr: &str, node: &str, ready: bool, zones: &[&str], nodes: &[&str]) -> String {
    let mut hints = String::new();
    if !zones.is_empty() || !nodes.is_empty() {
        hints.push_str("  hints:\n");
        if !zones.is_empty() {
            hints.push_str("    forZones:\n");
            for z in zones {
                let _ = writeln!(hints, "    - name: {z}");
            }
        }
        if !nodes.is_empty() {
            hints.push_str("    forNodes:\n");
            for n in nodes {
                let _ = writeln!(hints, "    - name: {n}");
            }
        }
    }
    ep(addr, node, ready, true, !ready) + &hints
}

/// Computes `web` (198.19.0.90, `extra` spec lines) over one slice of `endpoints` on `node`,
/// with the Nodes `nodes`; returns the frontend and the topology notes.
fn topology_case(
    extra: &str,
    endpoints: &str,
    nodes: Vec<Node>,
    node: &str,
) -> (Frontend, Vec<String>) {
    let snap = Snapshot::new(
        vec![web("web", "198.19.0.90", extra)],
        vec![web_slice("web-1", "web", 8080, endpoints)],
        nodes,
    );
    let state = compute_any_order(&snap, node);
    assert_eq!(state.errors, []);
    let ignored = state
        .topology_notes
        .iter()
        .map(ToString::to_string)
        .collect();
    (frontend(&state, &tcp("198.19.0.90", 80)).clone(), ignored)
}

/// Nodes 1 and 3 in zone-a, 2 in zone-b, 4 in zone-c, 5 without a zone.
fn zoned_nodes() -> Vec<Node> {
    vec![
        zoned_node("node1", Some("zone-a")),
        zoned_node("node2", Some("zone-b")),
        zoned_node("node3", Some("zone-a")),
        zoned_node("node4", Some("zone-c")),
        zoned_node("node5", None),
    ]
}

/// Ready endpoints on nodes 1, 2 and 3 with zone hints (`PreferClose`), plus a not-ready one on
/// node 2 without hints (only ready endpoints count).
fn zone_hinted_endpoints() -> String {
    hinted("198.18.1.1", "node1", true, &["zone-a"], &[])
        + &hinted("198.18.2.1", "node2", true, &["zone-b"], &[])
        + &hinted("198.18.3.1", "node3", true, &["zone-a"], &[])
        + &ep("198.18.2.2", "node2", false, false, false)
}

#[test]
fn zone_hints_send_new_connections_to_this_zones_endpoints() {
    let (f, ignored) = topology_case("", &zone_hinted_endpoints(), zoned_nodes(), "node1");
    assert_eq!(
        f.backends,
        [local(b("198.18.1.1:8080")), b("198.18.3.1:8080")]
    );
    assert_eq!(
        f.kept_backends,
        [b("198.18.2.1:8080")],
        "another zone's endpoint keeps its connections"
    );
    assert_eq!(f.unready_backends, [b("198.18.2.2:8080")]);
    assert_eq!(ignored, Vec::<String>::new());
    let (f, _) = topology_case("", &zone_hinted_endpoints(), zoned_nodes(), "node2");
    assert_eq!(f.backends, [local(b("198.18.2.1:8080"))]);
}

#[test]
fn node_hints_are_preferred_then_zone_hints() {
    // PreferSameNode: every ready endpoint has its node and its zone.
    let endpoints = hinted("198.18.1.1", "node1", true, &["zone-a"], &["node1"])
        + &hinted("198.18.2.1", "node2", true, &["zone-b"], &["node2"])
        + &hinted("198.18.3.1", "node3", true, &["zone-a"], &["node3"]);
    let (f, ignored) = topology_case("", &endpoints, zoned_nodes(), "node1");
    assert_eq!(f.backends, [local(b("198.18.1.1:8080"))]);
    assert_eq!(ignored, Vec::<String>::new());
    // node6 (zone-a, no endpoint of its own): same zone.
    let mut nodes = zoned_nodes();
    nodes.push(zoned_node("node6", Some("zone-a")));
    let (f, ignored) = topology_case("", &endpoints, nodes, "node6");
    assert_eq!(f.backends, [b("198.18.1.1:8080"), b("198.18.3.1:8080")]);
    assert_eq!(ignored, Vec::<String>::new());
    // node4 (zone-c): neither; all, and why.
    let (f, ignored) = topology_case("", &endpoints, zoned_nodes(), "node4");
    assert_eq!(f.backends.len(), 3);
    assert_eq!(
        ignored,
        [
            "Service default/web: topology hints ignored, every endpoint is used: no ready \
             endpoint is hinted for this node's zone \"zone-c\""
        ]
    );
}

#[test]
fn node_hints_without_zone_hints_fall_back_to_all() {
    let endpoints = hinted("198.18.1.1", "node1", true, &[], &["node1"])
        + &hinted("198.18.2.1", "node2", true, &[], &["node2"]);
    let (f, _) = topology_case("", &endpoints, zoned_nodes(), "node1");
    assert_eq!(f.backends, [local(b("198.18.1.1:8080"))]);
    let (f, ignored) = topology_case("", &endpoints, zoned_nodes(), "node3");
    assert_eq!(f.backends, [b("198.18.1.1:8080"), b("198.18.2.1:8080")]);
    assert_eq!(
        ignored,
        [
            "Service default/web: topology hints ignored, every endpoint is used: no ready \
             endpoint is hinted for this node, and not every one has a zone hint"
        ]
    );
}

#[test]
fn a_ready_endpoint_without_hints_means_all_endpoints() {
    let endpoints = zone_hinted_endpoints() + &hinted("198.18.4.1", "node4", true, &[], &[]);
    let (f, ignored) = topology_case("", &endpoints, zoned_nodes(), "node1");
    assert_eq!(
        f.backends,
        [
            local(b("198.18.1.1:8080")),
            b("198.18.2.1:8080"),
            b("198.18.3.1:8080"),
            b("198.18.4.1:8080")
        ]
    );
    assert_eq!(
        ignored,
        [
            "Service default/web: topology hints ignored, every endpoint is used: not every \
             ready endpoint has a zone hint, nor every one a node hint"
        ]
    );
}

#[test]
fn a_node_without_zone_label_uses_all_endpoints() {
    for nodes in [zoned_nodes(), Vec::new()] {
        let (f, ignored) = topology_case("", &zone_hinted_endpoints(), nodes, "node5");
        assert_eq!(f.backends.len(), 3);
        assert_eq!(
            ignored,
            [
                "Service default/web: topology hints ignored, every endpoint is used: this \
                 node has no topology.kubernetes.io/zone label"
            ]
        );
    }
}

#[test]
fn no_endpoint_for_this_zone_means_all_endpoints() {
    let (f, ignored) = topology_case("", &zone_hinted_endpoints(), zoned_nodes(), "node4");
    assert_eq!(
        f.backends,
        [
            b("198.18.1.1:8080"),
            b("198.18.2.1:8080"),
            b("198.18.3.1:8080")
        ]
    );
    assert_eq!(ignored.len(), 1, "{ignored:?}");
    assert!(ignored[0].ends_with("\"zone-c\""), "{ignored:?}");
}

#[test]
fn the_terminating_fallback_ignores_topology() {
    // No ready endpoint: every serving terminating one, whatever its hints.
    let endpoints = hinted("198.18.1.1", "node1", false, &["zone-a"], &[])
        + &hinted("198.18.2.1", "node2", false, &["zone-b"], &[]);
    let (f, ignored) = topology_case("", &endpoints, zoned_nodes(), "node1");
    assert_eq!(
        f.backends,
        [
            local(terminating(b("198.18.1.1:8080"))),
            terminating(b("198.18.2.1:8080"))
        ]
    );
    assert_eq!(ignored, Vec::<String>::new());
}

#[test]
fn internal_traffic_policy_local_ignores_topology() {
    // The local endpoint is hinted for another zone: Local still uses it, and says nothing.
    let endpoints = hinted("198.18.1.1", "node1", true, &["zone-b"], &[])
        + &hinted("198.18.2.1", "node2", true, &["zone-a"], &[]);
    let (f, ignored) = topology_case(
        "  internalTrafficPolicy: Local\n",
        &endpoints,
        zoned_nodes(),
        "node1",
    );
    assert_eq!(f.backends, [local(b("198.18.1.1:8080"))]);
    assert_eq!(f.kept_backends, [b("198.18.2.1:8080")]);
    assert_eq!(ignored, Vec::<String>::new());
}

#[test]
fn a_zone_change_of_this_node_is_not_served_from_the_memo() {
    let snap = |zone: &str| {
        Snapshot::new(
            vec![web("web", "198.19.0.90", "")],
            vec![web_slice("web-1", "web", 8080, &zone_hinted_endpoints())],
            vec![zoned_node("node9", Some(zone))],
        )
    };
    let (a, b_zone) = (snap("zone-a"), snap("zone-b"));
    // The same Service and slice objects: only the Node differs.
    let b_zone = Snapshot {
        services: a.services.clone(),
        slices: a.slices.clone(),
        nodes: b_zone.nodes,
    };
    let mut memo = Memo::default();
    let first = compute_with(&a, "node9", &mut memo);
    assert_eq!(frontend(&first, &tcp("198.19.0.90", 80)).backends.len(), 2);
    let moved = compute_with(&b_zone, "node9", &mut memo);
    assert_eq!(moved, compute(&b_zone, "node9"));
    assert_eq!(
        frontend(&moved, &tcp("198.19.0.90", 80)).backends,
        [b("198.18.2.1:8080")]
    );
}

// ---------------------------------------------------------------------------------------------
// Session affinity
// ---------------------------------------------------------------------------------------------

#[test]
fn session_affinity_client_ip_defaults_to_three_hours() {
    let svc = web("web", "198.19.0.90", "  sessionAffinity: ClientIP\n");
    let state = compute(&snapshot(vec![svc], vec![]), "n");
    assert_eq!(
        frontend(&state, &tcp("198.19.0.90", 80))
            .affinity_timeout
            .map(|d| d.as_secs()),
        Some(10_800)
    );
}

#[test]
fn session_affinity_client_ip_with_timeout() {
    // As the API server stores it.
    let svc = web(
        "web",
        "198.19.0.91",
        r"
  sessionAffinity: ClientIP
  sessionAffinityConfig:
    clientIP:
      timeoutSeconds: 60
",
    );
    let max = web(
        "max",
        "198.19.0.92",
        r"
  sessionAffinity: ClientIP
  sessionAffinityConfig:
    clientIP:
      timeoutSeconds: 86400
",
    );
    let none = web("none", "198.19.0.93", "  sessionAffinity: None\n");
    let state = compute(&snapshot(vec![svc, max, none], vec![]), "n");
    assert_eq!(state.errors, []);
    assert_eq!(
        frontend(&state, &tcp("198.19.0.91", 80))
            .affinity_timeout
            .map(|d| d.as_secs()),
        Some(60)
    );
    assert_eq!(
        frontend(&state, &tcp("198.19.0.92", 80))
            .affinity_timeout
            .map(|d| d.as_secs()),
        Some(86_400)
    );
    assert_eq!(
        frontend(&state, &tcp("198.19.0.93", 80)).affinity_timeout,
        None
    );
}

// ---------------------------------------------------------------------------------------------
// Services that get no frontend
// ---------------------------------------------------------------------------------------------

#[test]
fn ignored_services_give_nothing_and_no_error() {
    let headless = service(
        "headless",
        "",
        r"
  clusterIP: None
  clusterIPs:
  - None
  ports:
  - name: http
    port: 80
",
    );
    let headless_label = service(
        "headless-label",
        r#"
  labels:
    service.kubernetes.io/headless: ""
"#,
        r"
  clusterIP: 198.19.1.2
  ports:
  - name: http
    port: 80
",
    );
    let external_name = service(
        "ext",
        "",
        r"
  externalName: db.example.com
  type: ExternalName
  ports:
  - port: 5432
",
    );
    let other_proxy = service(
        "other-proxy",
        r"
  labels:
    service.kubernetes.io/service-proxy-name: some-other-proxy
",
        r"
  clusterIP: 198.19.1.3
  ports:
  - name: http
    port: 80
",
    );
    let unallocated = service(
        "unallocated",
        "",
        r"
  ports:
  - name: http
    port: 80
",
    );
    let no_spec: Service = yaml(
        r"
apiVersion: v1
kind: Service
metadata:
  name: nospec
",
    );
    let sl = web_slice(
        "headless-1",
        "headless",
        8080,
        &ready("198.18.1.1", "node1"),
    );
    let state = compute_any_order(
        &snapshot(
            vec![
                headless,
                headless_label,
                external_name,
                other_proxy,
                unallocated,
                no_spec,
            ],
            vec![sl],
        ),
        "node1",
    );
    assert_eq!(state, DesiredState::default());
}

#[test]
fn ignored_services_are_not_validated() {
    // kube-proxy never looks at them; neither do we.
    let other_proxy = service(
        "other-proxy",
        r"
  labels:
    service.kubernetes.io/service-proxy-name: x
",
        r"
  clusterIP: bogus
  ports:
  - port: 0
    protocol: ICMP
",
    );
    let headless = service(
        "headless",
        "",
        r"
  clusterIP: None
  ports:
  - port: 70000
",
    );
    let state = compute(&snapshot(vec![other_proxy, headless], vec![]), "n");
    assert_eq!(state, DesiredState::default());
}

// ---------------------------------------------------------------------------------------------
// Validation: one error per bad field, the bad object skipped, the rest still produced
// ---------------------------------------------------------------------------------------------

/// Computes `bad` next to a good Service and its slice; checks the good one is intact, that
/// `bad` produced no frontend, and returns the errors as (field, reason).
fn errors_of_bad_service(bad: Service) -> Vec<(String, String)> {
    let good = web("good", "198.19.2.1", "");
    let good_slice = web_slice("good-1", "good", 8080, &ready("198.18.1.1", "node1"));
    let state = compute_any_order(&snapshot(vec![bad, good], vec![good_slice]), "node1");
    assert_eq!(state.frontends.len(), 1, "{state:#?}");
    assert_eq!(
        frontend(&state, &tcp("198.19.2.1", 80)).backends,
        [local(b("198.18.1.1:8080"))]
    );
    assert!(
        state
            .errors
            .iter()
            .all(|e| e.kind == "Service" && e.name == "bad")
    );
    state
        .errors
        .into_iter()
        .map(|e| (e.field, e.reason))
        .collect()
}

fn only_field(errors: &[(String, String)]) -> &str {
    assert_eq!(errors.len(), 1, "{errors:#?}");
    &errors[0].0
}

#[test]
fn unparseable_cluster_ip_is_an_error() {
    let errors = errors_of_bad_service(service(
        "bad",
        "",
        r"
  clusterIP: 198.19.0.300
  ports:
  - port: 80
",
    ));
    assert_eq!(only_field(&errors), "spec.clusterIP");
    assert_eq!(errors[0].1, "\"198.19.0.300\" is not an IP address");

    let errors = errors_of_bad_service(service(
        "bad",
        "",
        r"
  clusterIP: 198.19.0.3
  clusterIPs:
  - 198.19.0.3
  - 2001:db8::zz
  ports:
  - port: 80
",
    ));
    assert_eq!(only_field(&errors), "spec.clusterIPs[1]");
}

#[test]
fn inconsistent_cluster_ips_are_errors() {
    let errors = errors_of_bad_service(service(
        "bad",
        "",
        r"
  clusterIP: 198.19.0.4
  clusterIPs:
  - 198.19.0.5
  ports:
  - port: 80
",
    ));
    assert_eq!(only_field(&errors), "spec.clusterIP");

    let errors = errors_of_bad_service(service(
        "bad",
        "",
        r"
  clusterIPs:
  - 198.19.0.6
  - 198.19.0.7
  ports:
  - port: 80
",
    ));
    assert_eq!(only_field(&errors), "spec.clusterIPs[1]");
    assert!(errors[0].1.contains("one address per IP family"));

    let errors = errors_of_bad_service(service(
        "bad",
        "",
        r"
  clusterIP: 0.0.0.0
  ports:
  - port: 80
",
    ));
    assert_eq!(only_field(&errors), "spec.clusterIP");
}

#[test]
fn port_out_of_range_is_an_error() {
    for port in ["0", "65536", "-80"] {
        let errors = errors_of_bad_service(service(
            "bad",
            "",
            &format!(
                r"
  clusterIP: 198.19.0.8
  ports:
  - name: a
    port: 80
  - name: b
    port: {port}
"
            ),
        ));
        assert_eq!(only_field(&errors), "spec.ports[1].port");
        assert_eq!(errors[0].1, format!("{port} is not in 1..=65535"));
    }
}

#[test]
fn unknown_protocol_is_an_error() {
    for proto in ["HTTP", "tcp", "\"\""] {
        let errors = errors_of_bad_service(service(
            "bad",
            "",
            &format!(
                r"
  clusterIP: 198.19.0.9
  ports:
  - port: 80
    protocol: {proto}
"
            ),
        ));
        assert_eq!(only_field(&errors), "spec.ports[0].protocol");
    }
}

#[test]
fn node_port_out_of_range_is_an_error_and_zero_means_unset() {
    for node_port in ["70000", "-1"] {
        let errors = errors_of_bad_service(service(
            "bad",
            "",
            &format!(
                r"
  type: NodePort
  clusterIP: 198.19.0.11
  ports:
  - port: 80
    nodePort: {node_port}
"
            ),
        ));
        assert_eq!(only_field(&errors), "spec.ports[0].nodePort");
    }
    let ok = service(
        "ok",
        "",
        r"
  type: NodePort
  clusterIP: 198.19.0.12
  ports:
  - port: 80
    nodePort: 0
  - name: b
    port: 81
    nodePort: 30081
",
    );
    let state = compute(&snapshot(vec![ok], vec![]), "n");
    assert_eq!(state.errors, []);
    assert_eq!(state.frontends.len(), 2);
}

#[test]
fn invalid_affinity_timeout_is_an_error() {
    for timeout in ["0", "86401", "-5"] {
        let errors = errors_of_bad_service(service(
            "bad",
            "",
            &format!(
                r"
  clusterIP: 198.19.0.13
  ports:
  - port: 80
  sessionAffinity: ClientIP
  sessionAffinityConfig:
    clientIP:
      timeoutSeconds: {timeout}
"
            ),
        ));
        assert_eq!(
            only_field(&errors),
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds"
        );
        assert_eq!(errors[0].1, format!("{timeout} is not in 1..=86400"));
    }
}

#[test]
fn unknown_enum_values_are_errors() {
    let cases = [
        ("  sessionAffinity: Sticky\n", "spec.sessionAffinity"),
        (
            "  internalTrafficPolicy: Nearest\n",
            "spec.internalTrafficPolicy",
        ),
        ("  type: Magic\n", "spec.type"),
    ];
    for (extra, field) in cases {
        let errors = errors_of_bad_service(service(
            "bad",
            "",
            &format!(
                r"
  clusterIP: 198.19.0.14
  ports:
  - port: 80
{extra}"
            ),
        ));
        assert_eq!(only_field(&errors), field);
    }
}

#[test]
fn duplicate_ports_are_errors() {
    let errors = errors_of_bad_service(service(
        "bad",
        "",
        r"
  clusterIP: 198.19.0.15
  ports:
  - name: a
    port: 80
  - name: b
    port: 80
    protocol: TCP
  - name: c
    port: 80
    protocol: UDP
",
    ));
    assert_eq!(only_field(&errors), "spec.ports[1]");
    assert_eq!(errors[0].1, "duplicate port 80/TCP (also spec.ports[0])");

    let errors = errors_of_bad_service(service(
        "bad",
        "",
        r"
  clusterIP: 198.19.0.15
  ports:
  - name: a
    port: 80
  - name: a
    port: 81
",
    ));
    assert_eq!(only_field(&errors), "spec.ports[1].name");
}

#[test]
fn every_bad_field_is_reported() {
    let errors = errors_of_bad_service(service(
        "bad",
        "",
        r"
  clusterIP: 198.19.0.16
  ports:
  - name: a
    port: 0
    protocol: ICMP
    nodePort: 99999
  - name: b
    port: 81
  sessionAffinity: ClientIP
  sessionAffinityConfig:
    clientIP:
      timeoutSeconds: 0
  internalTrafficPolicy: local
",
    ));
    let fields: Vec<&str> = errors.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(
        fields,
        [
            "spec.internalTrafficPolicy",
            "spec.ports[0].nodePort",
            "spec.ports[0].port",
            "spec.ports[0].protocol",
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
        ]
    );
}

#[test]
fn nameless_service_is_an_error() {
    let nameless: Service = yaml(
        r"
apiVersion: v1
kind: Service
metadata:
  namespace: default
spec:
  clusterIP: 198.19.0.17
  ports:
  - port: 80
",
    );
    let state = compute_any_order(&snapshot(vec![nameless.clone(), nameless], vec![]), "n");
    assert_eq!(state.frontends.len(), 0);
    assert_eq!(fields(&state), [("Service", "", "metadata.name")]);
}

#[test]
fn error_messages_name_object_field_and_reason() {
    let bad = service(
        "bad",
        "",
        r"
  clusterIP: 198.19.0.18
  ports:
  - port: 70000
",
    );
    let state = compute(&snapshot(vec![bad], vec![]), "n");
    assert_eq!(
        state.errors[0].to_string(),
        "Service default/bad: spec.ports[0].port: 70000 is not in 1..=65535"
    );
}

// --- EndpointSlices ---------------------------------------------------------------------------

#[test]
fn bad_endpoint_is_skipped_and_the_rest_of_the_slice_kept() {
    let svc = web("web", "198.19.3.1", "");
    let sl = slice(
        "web-1",
        "web",
        r"
addressType: IPv4
ports:
- name: http
  port: 8080
endpoints:
- addresses:
  - 198.18.1.300
- addresses:
  - 2001:db8::5
- addresses: []
- addresses:
  - 198.18.1.4
",
    );
    let state = compute_any_order(&snapshot(vec![svc], vec![sl]), "n");
    assert_eq!(
        frontend(&state, &tcp("198.19.3.1", 80)).backends,
        [b("198.18.1.4:8080")]
    );
    assert_eq!(
        fields(&state),
        [
            ("EndpointSlice", "web-1", "endpoints[0].addresses[0]"),
            ("EndpointSlice", "web-1", "endpoints[1].addresses[0]"),
            ("EndpointSlice", "web-1", "endpoints[2].addresses"),
        ]
    );
    assert_eq!(
        state.errors[1].reason,
        "\"2001:db8::5\" is not an IPv4 address (the slice's addressType)"
    );
    assert_eq!(
        state.errors[0].to_string(),
        "EndpointSlice default/web-1: endpoints[0].addresses[0]: \"198.18.1.300\" is not an IP \
         address"
    );
}

#[test]
fn bad_slice_is_skipped_and_other_slices_kept() {
    let svc = web("web", "198.19.3.2", "");
    let good = web_slice("web-good", "web", 8080, &ready("198.18.1.1", "node2"));
    let cases = [
        (
            r"
addressType: IPv4
ports:
- name: http
  port: 70000
endpoints:
- addresses:
  - 198.18.1.2
",
            "ports[0].port",
        ),
        (
            r"
addressType: IPv4
ports:
- name: http
  port: 0
endpoints: []
",
            "ports[0].port",
        ),
        (
            r"
addressType: IPv4
ports:
- name: http
  port: 8080
  protocol: QUIC
endpoints: []
",
            "ports[0].protocol",
        ),
        (
            r"
addressType: IPv4
ports:
- name: http
  port: 8080
- name: http
  port: 8081
endpoints: []
",
            "ports[1].name",
        ),
        (
            r"
addressType: IPX
endpoints: []
",
            "addressType",
        ),
    ];
    for (body, field) in cases {
        let bad = slice("web-bad", "web", body);
        let state = compute_any_order(&snapshot(vec![svc.clone()], vec![bad, good.clone()]), "n");
        assert_eq!(
            fields(&state),
            [("EndpointSlice", "web-bad", field)],
            "{body}"
        );
        assert_eq!(
            frontend(&state, &tcp("198.19.3.2", 80)).backends,
            [b("198.18.1.1:8080")],
            "{body}"
        );
    }
}

// --- Conflicts and duplicates -----------------------------------------------------------------

#[test]
fn two_services_on_one_frontend_first_by_name_wins() {
    let a = web("a", "198.19.4.1", "");
    let z = web("z", "198.19.4.1", "");
    let z_slice = web_slice("z-1", "z", 8080, &ready("198.18.1.1", "n"));
    let state = compute_any_order(&snapshot(vec![z, a], vec![z_slice]), "n");
    let f = frontend(&state, &tcp("198.19.4.1", 80));
    assert_eq!(f.service.name.as_ref(), "a");
    assert_eq!(f.backends, []);
    assert_eq!(fields(&state), [("Service", "z", "spec.clusterIP")]);
    assert!(
        state.errors[0]
            .reason
            .contains("already used by Service default/a")
    );
}

#[test]
fn identical_duplicate_objects_merge() {
    let svc = web("web", "198.19.4.2", "");
    let sl = web_slice("web-1", "web", 8080, &ready("198.18.1.1", "n"));
    let once = compute(&snapshot(vec![svc.clone()], vec![sl.clone()]), "n");
    let twice = compute_any_order(&snapshot(vec![svc.clone(), svc], vec![sl.clone(), sl]), "n");
    assert_eq!(once, twice);
    assert_eq!(twice.errors, []);
}

#[test]
fn differing_duplicate_objects_are_all_rejected() {
    let v1 = web("web", "198.19.4.3", "");
    let v2 = web("web", "198.19.4.4", "");
    let other = web("other", "198.19.4.5", "");
    let s1 = web_slice("other-1", "other", 8080, &ready("198.18.1.1", "n"));
    let s2 = web_slice("other-1", "other", 8080, &ready("198.18.1.2", "n"));
    let state = compute_any_order(&snapshot(vec![v1, other, v2], vec![s1, s2]), "n");
    assert_eq!(
        state.frontends.keys().copied().collect::<Vec<_>>(),
        [tcp("198.19.4.5", 80)]
    );
    assert_eq!(frontend(&state, &tcp("198.19.4.5", 80)).backends, []);
    assert_eq!(
        fields(&state),
        [
            ("EndpointSlice", "other-1", "metadata.name"),
            ("Service", "web", "metadata.name"),
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Robustness: many generated objects, no panic, order independence, invariants
// ---------------------------------------------------------------------------------------------

/// A tiny deterministic generator (no extra crate needed).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        let n = u64::try_from(items.len()).unwrap();
        items[usize::try_from(self.next() % n).unwrap()]
    }
}

fn generated_snapshot(seed: u64) -> Snapshot {
    let mut rng = Lcg(seed);
    let ips = [
        "198.19.9.1",
        "198.19.9.2",
        "2001:db8::9:1",
        "None",
        "\"\"",
        "bogus",
        "0.0.0.0",
    ];
    let ports = ["80", "0", "443", "65536", "-1", "53"];
    let protos = ["TCP", "UDP", "SCTP", "ICMP"];
    let names = ["a", "b", "\"\""];
    let policies = ["Cluster", "Local", "Elsewhere"];
    let bools = ["true", "false", "null"];
    let nodes = ["node1", "node2", "\"\""];
    let addrs = [
        "198.18.0.1",
        "198.18.0.2",
        "2001:db8::1",
        "nope",
        "198.18.0.3",
    ];
    let svc_names = ["s1", "s2", "s3"];

    let mut services = Vec::new();
    for _ in 0..4 {
        let mut spec = format!(
            r"
  clusterIPs:
  - {}
  - {}
  internalTrafficPolicy: {}
  ports:
",
            rng.pick(&ips),
            rng.pick(&ips),
            rng.pick(&policies)
        );
        for _ in 0..2 {
            write!(
                spec,
                r"
  - name: {}
    port: {}
    protocol: {}
",
                rng.pick(&names),
                rng.pick(&ports),
                rng.pick(&protos)
            )
            .unwrap();
        }
        services.push(service(rng.pick(&svc_names), "", &spec));
    }
    let mut slices = Vec::new();
    for i in 0..5 {
        let mut body = format!(
            r"
addressType: {}
ports:
- name: {}
  port: {}
  protocol: {}
endpoints:
",
            rng.pick(&["IPv4", "IPv6", "FQDN"]),
            rng.pick(&names),
            rng.pick(&["8080", "8081", "0", "99999"]),
            rng.pick(&protos)
        );
        for _ in 0..3 {
            write!(
                body,
                r"
- addresses:
  - {}
  conditions:
    ready: {}
    serving: {}
    terminating: {}
  nodeName: {}
",
                rng.pick(&addrs),
                rng.pick(&bools),
                rng.pick(&bools),
                rng.pick(&bools),
                rng.pick(&nodes)
            )
            .unwrap();
        }
        slices.push(slice(
            &format!("slice-{}", i % 3),
            rng.pick(&svc_names),
            &body,
        ));
    }
    Snapshot::new(services, slices, Vec::new())
}

/// Mixes two snapshots object by object, keeping the objects' identity (`Arc`), the way a
/// reflector store changes some objects and keeps the others.
fn mixed(a: &Snapshot, b: &Snapshot, rng: &mut Lcg) -> Snapshot {
    fn pick<T>(a: &[Arc<T>], b: &[Arc<T>], rng: &mut Lcg) -> Vec<Arc<T>> {
        let n = a.len().max(b.len());
        (0..n)
            .filter_map(|i| match rng.next() % 3 {
                0 => a.get(i).cloned(),
                1 => b.get(i).cloned(),
                _ => None,
            })
            .collect()
    }
    Snapshot {
        services: pick(&a.services, &b.services, rng),
        slices: pick(&a.slices, &b.slices, rng),
        nodes: a.nodes.clone(),
    }
}

#[test]
fn memoized_passes_equal_passes_from_scratch() {
    let mut rng = Lcg(7);
    let mut hits = 0;
    for seed in 0..150 {
        let a = generated_snapshot(seed);
        let b = generated_snapshot(seed + 10_000);
        let mut memo = Memo::default();
        assert_eq!(
            compute_with(&a, "node1", &mut memo),
            compute(&a, "node1"),
            "seed {seed}"
        );
        let before: Vec<*const Svc> = memo
            .groups
            .values()
            .flat_map(HashMap::values)
            .filter_map(|e| e.service.as_ref().map(Arc::as_ptr))
            .collect();
        for round in 0..4 {
            let m = mixed(&a, &b, &mut rng);
            assert_eq!(
                compute_with(&m, "node1", &mut memo),
                compute(&m, "node1"),
                "seed {seed} round {round}"
            );
            hits += m
                .services
                .iter()
                .filter(|s| before.contains(&Arc::as_ptr(s)))
                .count();
        }
        // A memo made for another node is not used for this one.
        assert_eq!(compute_with(&a, "node2", &mut memo), compute(&a, "node2"));
    }
    assert!(
        hits > 100,
        "the mixes reused too few objects to exercise the memo ({hits})"
    );
}

#[test]
fn an_unchanged_service_is_not_recomputed() {
    let snap = Snapshot::new(
        vec![yaml(FRONTEND_SVC)],
        vec![yaml(FRONTEND_SLICE)],
        vec![yaml(NODE1)],
    );
    let mut memo = Memo::default();
    let first = compute_with(&snap, "node1", &mut memo);
    assert_eq!(memo.recomputed(), 1);
    assert_eq!(compute_with(&snap, "node1", &mut memo), first);
    assert_eq!(memo.recomputed(), 0, "the same objects were computed again");
    // A changed slice (a new object) is.
    let mut changed = snap.clone();
    changed.slices = vec![Arc::new((*snap.slices[0]).clone())];
    assert_eq!(compute_with(&changed, "node1", &mut memo), first);
    assert_eq!(memo.recomputed(), 1);
    // Another node: everything is.
    let _ = compute_with(&changed, "node2", &mut memo);
    assert_eq!(memo.recomputed(), 1);
}

#[test]
fn generated_snapshots_never_panic_and_do_not_depend_on_order() {
    for seed in 0..200 {
        let snap = generated_snapshot(seed);
        let state = compute_any_order(&snap, "node1");
        for (key, f) in &state.frontends {
            let all: Vec<&Backend> = f.backends.iter().chain(&f.kept_backends).collect();
            for w in f.backends.windows(2).chain(f.kept_backends.windows(2)) {
                assert!(w[0] < w[1], "seed {seed}: unsorted or duplicate backends");
            }
            for (i, x) in all.iter().enumerate() {
                assert_eq!(x.addr.is_ipv4(), key.addr.is_ipv4(), "seed {seed}: family");
                assert!(
                    all[i + 1..]
                        .iter()
                        .all(|y| (y.addr, y.port) != (x.addr, x.port)),
                    "seed {seed}: backends and kept_backends overlap"
                );
            }
        }
    }
}

#[test]
fn degenerate_objects_do_not_panic() {
    let services: Vec<Service> = vec![
        yaml(
            r"
apiVersion: v1
kind: Service
metadata: {}
",
        ),
        yaml(
            r"
apiVersion: v1
kind: Service
metadata: {}
spec: {}
",
        ),
        yaml(
            r"
apiVersion: v1
kind: Service
metadata: {}
spec:
  clusterIPs: []
",
        ),
        yaml(
            r"
apiVersion: v1
kind: Service
metadata: {}
spec:
  clusterIP: 198.19.0.1
  ports: []
",
        ),
    ];
    let slices: Vec<EndpointSlice> = vec![
        yaml(
            r"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {}
addressType: IPv4
endpoints: []
",
        ),
        yaml(
            r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  labels:
    kubernetes.io/service-name: ""
addressType: ""
endpoints: []
"#,
        ),
    ];
    let nodes: Vec<Node> = vec![yaml(
        r"
apiVersion: v1
kind: Node
metadata: {}
",
    )];
    let snap = Snapshot::new(services, slices, nodes);
    let _ = compute_any_order(&snap, "");
    let _ = compute_any_order(&snap, "node1");
}

mod external;
