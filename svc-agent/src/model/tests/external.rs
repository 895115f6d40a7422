//! `NodePort`, external IPs, load balancer IPs, `externalTrafficPolicy`, source ranges and
//! health-check node ports.

use super::*;

/// node1 with two IPv4 addresses and one IPv6 address (status order: `InternalIP` v4,
/// `ExternalIP` v4, `InternalIP` v6).
const NODE1_ADDRS: &str = r"
apiVersion: v1
kind: Node
metadata:
  name: node1
status:
  addresses:
  - address: 198.18.0.1
    type: InternalIP
  - address: 198.18.5.1
    type: ExternalIP
  - address: 2001:db8::1
    type: InternalIP
";

fn with_node(services: Vec<Service>, slices: Vec<EndpointSlice>) -> Snapshot {
    Snapshot::new(services, slices, vec![yaml::<Node>(NODE1_ADDRS)])
}

fn ext(addr: &str, port: u16) -> FrontendKey {
    FrontendKey {
        scope: Scope::External,
        ..tcp(addr, port)
    }
}

/// A `NodePort` web Service (port 80, `nodePort` 30080) with `extra` spec lines.
fn node_port(name: &str, extra: &str) -> Service {
    web(
        name,
        "198.19.0.10",
        &format!("    nodePort: 30080\n  type: NodePort\n{extra}"),
    )
}

/// Two endpoints: 198.18.1.10 on node1 and 198.18.2.10 on node2 (port 8080).
fn two_endpoints(svc: &str) -> EndpointSlice {
    web_slice(
        "s1",
        svc,
        8080,
        &(ready("198.18.1.10", "node1") + &ready("198.18.2.10", "node2")),
    )
}

fn addrs(backends: &[Backend]) -> Vec<String> {
    backends.iter().map(|b| b.addr.to_string()).collect()
}

#[test]
fn a_node_port_is_served_on_every_node_address_of_the_services_families() {
    let state = compute_any_order(
        &with_node(vec![node_port("web", "")], vec![two_endpoints("web")]),
        "node1",
    );
    assert_eq!(state.errors, []);
    let keys: Vec<String> = state.frontends.keys().map(ToString::to_string).collect();
    // Single-stack IPv4: the IPv6 node address serves nothing.
    assert_eq!(
        keys,
        [
            "198.18.0.1:30080/TCP (internal)",
            "198.18.0.1:30080/TCP (external)",
            "198.18.5.1:30080/TCP (internal)",
            "198.18.5.1:30080/TCP (external)",
            "198.19.0.10:80/TCP (internal)",
        ]
    );
    for key in [ext("198.18.0.1", 30080), tcp("198.18.5.1", 30080)] {
        let fe = frontend(&state, &key);
        assert_eq!(fe.kind, FrontendKind::NodePort, "{key}");
        assert_eq!(addrs(&fe.backends), ["198.18.1.10", "198.18.2.10"], "{key}");
        assert!(
            !fe.local_only && fe.on_empty == EmptyAction::Reject,
            "{key}"
        );
    }
    assert_eq!(
        frontend(&state, &tcp("198.19.0.10", 80)).kind,
        FrontendKind::ClusterIp
    );
    assert!(state.health_checks.is_empty());
}

#[test]
fn external_traffic_policy_local_keeps_external_traffic_on_this_node_only() {
    let svc = web(
        "web",
        "198.19.0.10",
        "    nodePort: 30080\n  type: LoadBalancer\n  externalTrafficPolicy: Local\n  \
         healthCheckNodePort: 32000\n",
    );
    let state = compute(
        &with_node(vec![svc.clone()], vec![two_endpoints("web")]),
        "node1",
    );
    assert_eq!(state.errors, []);
    let outside = frontend(&state, &ext("198.18.0.1", 30080));
    assert_eq!(addrs(&outside.backends), ["198.18.1.10"]);
    assert_eq!(addrs(&outside.kept_backends), ["198.18.2.10"]);
    assert!(outside.local_only);
    // From pods and host processes: every endpoint.
    let inside = frontend(&state, &tcp("198.18.0.1", 30080));
    assert_eq!(addrs(&inside.backends), ["198.18.1.10", "198.18.2.10"]);
    assert!(!inside.local_only);
    let check = &state.health_checks[&32000];
    assert_eq!(
        (&*check.namespace, &*check.name, check.local_endpoints),
        ("default", "web", 1)
    );

    // Only the remote endpoint: external traffic is dropped (not rejected), the health check
    // says 0.
    let remote_only = web_slice("s1", "web", 8080, &ready("198.18.2.10", "node2"));
    let state = compute(&with_node(vec![svc.clone()], vec![remote_only]), "node1");
    let outside = frontend(&state, &ext("198.18.0.1", 30080));
    assert!(outside.backends.is_empty());
    assert_eq!(
        outside.on_empty,
        EmptyAction::Drop(DropReason::ExternalTrafficPolicyLocal)
    );
    assert_eq!(state.health_checks[&32000].local_endpoints, 0);

    // The local endpoint terminating (still serving): it keeps taking new external
    // connections (fallback), but the health check fails so load balancers steer away.
    let terminating = web_slice(
        "s1",
        "web",
        8080,
        &(ep("198.18.1.10", "node1", false, true, true) + &ready("198.18.2.10", "node2")),
    );
    let state = compute(&with_node(vec![svc], vec![terminating]), "node1");
    let outside = frontend(&state, &ext("198.18.0.1", 30080));
    assert_eq!(addrs(&outside.backends), ["198.18.1.10"]);
    assert_eq!(state.health_checks[&32000].local_endpoints, 0);
}

#[test]
fn external_and_load_balancer_ips_get_both_scopes_and_source_ranges_apply_outside_only() {
    let mut svc = web(
        "web",
        "198.19.0.10",
        "    nodePort: 30080\n  type: LoadBalancer\n  externalIPs: [198.18.7.1, 2001:db8::7]\n  \
         loadBalancerSourceRanges: [198.18.0.100/30, ' 198.18.9.0/24 ']\n",
    );
    svc.status = Some(yaml(
        "loadBalancer:\n  ingress:\n  - ip: 198.18.8.1\n  - ip: 198.18.8.2\n    ipMode: Proxy\n  \
         - hostname: lb.example\n",
    ));
    let state = compute_any_order(&with_node(vec![svc], vec![two_endpoints("web")]), "node1");
    assert_eq!(state.errors, []);
    let ext_ip = frontend(&state, &ext("198.18.7.1", 80));
    assert_eq!(ext_ip.kind, FrontendKind::ExternalIp);
    assert!(ext_ip.source_ranges.is_empty());
    let lb = frontend(&state, &ext("198.18.8.1", 80));
    assert_eq!(lb.kind, FrontendKind::LoadBalancerIp);
    let ranges: Vec<String> = lb.source_ranges.iter().map(ToString::to_string).collect();
    assert_eq!(ranges, ["198.18.0.100/30", "198.18.9.0/24"]);
    assert!(
        frontend(&state, &tcp("198.18.8.1", 80))
            .source_ranges
            .is_empty()
    );
    // ipMode Proxy: the load balancer delivers to the node; the IP is not captured.
    assert!(
        !state
            .frontends
            .keys()
            .any(|k| k.addr.to_string() == "198.18.8.2")
    );
    // The IPv6 external IP: the Service has no IPv6 ClusterIP, so it is not served.
    assert!(!state.frontends.keys().any(|k| k.addr.is_ipv6()));
}

#[test]
fn load_balancer_ips_need_type_load_balancer_and_node_ports_need_a_node() {
    let mut svc = web("web", "198.19.0.10", "    nodePort: 30080\n");
    svc.status = Some(yaml("loadBalancer:\n  ingress:\n  - ip: 198.18.8.1\n"));
    // A ClusterIP Service with a stale nodePort and ingress: only its ClusterIP.
    let state = compute(&with_node(vec![svc], vec![two_endpoints("web")]), "node1");
    let keys: Vec<String> = state.frontends.keys().map(ToString::to_string).collect();
    assert_eq!(keys, ["198.19.0.10:80/TCP (internal)"]);
    // A NodePort Service on a node without a Node object: no node addresses.
    let state = compute(
        &snapshot(vec![node_port("web", "")], vec![two_endpoints("web")]),
        "node1",
    );
    assert_eq!(state.frontends.len(), 1);
}

#[test]
fn nodeport_addresses_restrict_where_node_ports_listen() {
    let snap = with_node(vec![node_port("web", "")], vec![two_endpoints("web")]);
    let mut memo = Memo::with_nodeport_addresses(NodePortAddresses::parse("primary").unwrap());
    let state = compute_with(&snap, "node1", &mut memo);
    let node_ports: Vec<String> = (state.frontends.keys())
        .filter(|k| k.port == 30080)
        .map(|k| k.addr.to_string())
        .collect();
    assert_eq!(node_ports, ["198.18.0.1", "198.18.0.1"]);
    let mut memo =
        Memo::with_nodeport_addresses(NodePortAddresses::parse("198.18.5.0/24").unwrap());
    let state = compute_with(&snap, "node1", &mut memo);
    assert!(state.frontends.contains_key(&ext("198.18.5.1", 30080)));
    assert!(!state.frontends.contains_key(&ext("198.18.0.1", 30080)));
}

#[test]
fn node_facing_interface_addresses_serve_node_ports_too() {
    let snap = with_node(
        vec![node_port("web", ""), web("plain", "198.19.0.11", "")],
        vec![two_endpoints("web")],
    );
    let mut model = Model::new("node1");
    model.replace(&snap);
    assert!(
        !model
            .state()
            .frontends
            .contains_key(&ext("198.18.9.1", 30080))
    );

    // An interface address appears: only the NodePort Service is recomputed, and its node
    // port is served there too (both scopes), as by the full computation with that address.
    let host: Vec<IpAddr> = vec!["198.18.9.1".parse().unwrap()];
    model.set_host_addresses(host.clone());
    let delta = model.update();
    assert_eq!(model.recomputed(), 1);
    assert!(
        delta.frontends.contains(&ext("198.18.9.1", 30080)),
        "{delta:?}"
    );
    assert!(
        delta.frontends.contains(&tcp("198.18.9.1", 30080)),
        "{delta:?}"
    );
    let oracle = compute_with(
        &snap,
        "node1",
        &mut Memo::default().with_host_addresses(host.clone()),
    );
    assert!(Delta::between(model.state(), &oracle).is_empty());
    assert_eq!(
        model.nodeport_addresses(),
        ["198.18.0.1", "198.18.5.1", "198.18.9.1", "2001:db8::1"]
            .map(|a| a.parse::<IpAddr>().unwrap())
    );

    // The same addresses again: nothing to do. Gone: its frontends go.
    model.set_host_addresses(host);
    assert!(model.update().is_empty());
    model.set_host_addresses(vec![]);
    let delta = model.update();
    assert!(delta.frontends.contains(&ext("198.18.9.1", 30080)));
    assert!(
        !model
            .state()
            .frontends
            .contains_key(&ext("198.18.9.1", 30080))
    );
}

#[test]
fn bad_external_fields_are_errors_naming_the_field() {
    let cases = [
        ("  externalIPs: [198.18.7.1, nope]\n", "spec.externalIPs[1]"),
        ("  externalIPs: [0.0.0.0]\n", "spec.externalIPs[0]"),
        (
            "  loadBalancerSourceRanges: [198.18.0.0/33]\n",
            "spec.loadBalancerSourceRanges[0]",
        ),
        (
            "  externalTrafficPolicy: Nearby\n",
            "spec.externalTrafficPolicy",
        ),
        ("  healthCheckNodePort: 70000\n", "spec.healthCheckNodePort"),
    ];
    for (extra, field) in cases {
        let state = compute(
            &with_node(vec![node_port("web", extra)], vec![two_endpoints("web")]),
            "node1",
        );
        assert_eq!(fields(&state), [("Service", "web", field)], "{extra}");
        assert!(state.frontends.is_empty(), "never half-programmed: {extra}");
    }
    let mut svc = web("web", "198.19.0.10", "  type: LoadBalancer\n");
    svc.status = Some(yaml(
        "loadBalancer:\n  ingress:\n  - ip: 198.18.8.1\n    ipMode: Magic\n",
    ));
    let state = compute(&with_node(vec![svc], vec![]), "node1");
    assert_eq!(
        fields(&state),
        [("Service", "web", "status.loadBalancer.ingress[0].ipMode")]
    );
}

#[test]
fn two_services_on_one_health_check_port_the_first_keeps_it() {
    let svc = |name: &str, ip: &str| {
        web(
            name,
            ip,
            "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n",
        )
    };
    let state = compute_any_order(
        &with_node(
            vec![svc("b", "198.19.0.11"), svc("a", "198.19.0.10")],
            vec![],
        ),
        "node1",
    );
    assert_eq!(&*state.health_checks[&32000].name, "a");
    assert_eq!(
        fields(&state),
        [("Service", "b", "spec.healthCheckNodePort")]
    );
}
