//! The objects of the control-plane benchmarks (`svc-bench-sync`, `svc-heap`): `ClusterIP`
//! Services with one TCP port and one `EndpointSlice` each, numbered, with unique addresses in
//! the test ranges.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde_json::{Value, json};

use crate::netns::{SERVICE_V4, SERVICE_V6};

/// The Services' port.
pub const PORT: u16 = 80;
/// The endpoints' port (the first 32,768 endpoints; see [`endpoint`]).
pub const TARGET_PORT: u16 = 8080;
/// The namespace of every object.
pub const NAMESPACE: &str = "bench";

/// Services with IPv4 addresses; the others (`i` from here on) are `IPv6`: 198.19.0.0/16, the
/// test plan's IPv4 service range, holds 65,536 VIPs, and every address must stay in
/// 198.18.0.0/15 or `2001:db8::/32`.
pub const V4_SERVICES: u32 = 65_000;

/// The VIP of Service `i`: `198.19.x.y`, or `2001:db8:f::<n>` past [`V4_SERVICES`].
#[must_use]
pub fn vip(i: u32) -> IpAddr {
    if i < V4_SERVICES {
        SERVICE_V4.host(1 + i).into()
    } else {
        SERVICE_V6.host(1 + u128::from(i)).into()
    }
}

/// Endpoint `j` of Service `i` (of `width` endpoints each): a unique address:port, addresses in
/// 198.18.128.0/17 (the port grows every 32,768), or `2001:db8:e::<n>` for `IPv6` Services.
#[must_use]
pub fn endpoint(i: u32, j: u32, width: u32) -> (IpAddr, u16) {
    let n = i * width + j;
    if i < V4_SERVICES {
        let base = u32::from(Ipv4Addr::new(198, 18, 128, 0));
        let port = TARGET_PORT + u16::try_from(n / 32_768).unwrap_or(0);
        (Ipv4Addr::from(base + n % 32_768).into(), port)
    } else {
        let base = u128::from(Ipv6Addr::new(0x2001, 0xdb8, 0xe, 0, 0, 0, 0, 0));
        (Ipv6Addr::from(base + u128::from(n)).into(), TARGET_PORT)
    }
}

/// The `ipFamilies` entry and `addressType` of Service `i`.
#[must_use]
pub fn family(i: u32) -> &'static str {
    if i < V4_SERVICES { "IPv4" } else { "IPv6" }
}

/// Service `i`: `ClusterIP`, one TCP port ([`PORT`] to [`TARGET_PORT`]), single stack.
#[must_use]
pub fn service_json(i: u32) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc-{i}"), "namespace": NAMESPACE},
        "spec": {
            "type": "ClusterIP", "clusterIP": vip(i).to_string(), "clusterIPs": [vip(i).to_string()],
            "ipFamilies": [family(i)], "ipFamilyPolicy": "SingleStack",
            "ports": [{"name": "http", "port": PORT, "protocol": "TCP", "targetPort": TARGET_PORT}],
        },
    })
}

/// The slice of Service `i` (of `width` endpoints) holding its first `count` endpoints.
#[must_use]
pub fn slice_json(i: u32, width: u32, count: u32) -> Value {
    let eps: Vec<Value> = (0..count)
        .map(|j| {
            let (ip, _) = endpoint(i, j, width);
            // As the EndpointSlice controller writes it: every endpoint names its Pod (a
            // Deployment's: the ReplicaSet's hash and five characters).
            let pod = format!("svc-{i}-7d9f8b6c4-{j:05}");
            let uid = format!("4c1f2a9e-0b7d-4e3a-9c5f-{i:08x}{j:04x}");
            json!({"addresses": [ip.to_string()], "conditions": {"ready": true, "serving": true, "terminating": false}, "nodeName": "node2",
                   "targetRef": {"kind": "Pod", "namespace": NAMESPACE, "name": pod, "uid": uid}})
        })
        .collect();
    let (_, port) = endpoint(i, 0, width);
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": family(i),
        "metadata": {"name": format!("svc-{i}-abcde"), "namespace": NAMESPACE,
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": eps,
    })
}
