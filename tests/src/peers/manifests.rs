//! The same Services as Kubernetes objects for `svc-agent run --from-dir`: a `v1.Service` and a
//! `discovery.k8s.io/v1.EndpointSlice` per Service, as `kubectl get -o yaml` prints them.

use std::fmt::Write as _;

use super::services::{NAMESPACE, PORT, PORT_NAME, ServiceSpec, TARGET_PORT};

/// One YAML stream with every Service and its slice; endpoints are on node `node`.
#[must_use]
pub fn render(services: &[ServiceSpec], node: &str) -> String {
    let mut y = String::with_capacity(services.len() * 900);
    for s in services {
        let _ = write!(
            y,
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {NAMESPACE}\n\
             spec:\n  type: ClusterIP\n  clusterIP: {vip}\n  clusterIPs:\n  - {vip}\n  ipFamilies:\n  - IPv4\n\
             \x20 ipFamilyPolicy: SingleStack\n  ports:\n  - name: {PORT_NAME}\n    protocol: TCP\n\
             \x20   port: {PORT}\n    targetPort: {TARGET_PORT}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-x7r2k\n\
             \x20 namespace: {NAMESPACE}\n  labels:\n    kubernetes.io/service-name: {name}\n\
             \x20   endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io\n\
             addressType: IPv4\nendpoints:\n",
            name = s.name,
            vip = s.vip,
        );
        for ep in &s.endpoints {
            let _ = write!(
                y,
                "- addresses:\n  - {ep}\n  conditions:\n    ready: true\n    serving: true\n\
                 \x20   terminating: false\n  nodeName: {node}\n"
            );
        }
        let _ = write!(
            y,
            "ports:\n- name: {PORT_NAME}\n  port: {TARGET_PORT}\n  protocol: TCP\n"
        );
    }
    y
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, path::Path};

    use super::{super::services, *};

    #[test]
    fn the_agent_reads_every_object() {
        let be = [Ipv4Addr::new(198, 18, 1, 11), Ipv4Addr::new(198, 18, 1, 12)];
        let svcs = services::services(2, &be).unwrap();
        let text = render(&svcs, "node1");
        let parsed = svc_agent::source::parse_str(&text, Path::new("services.yaml"));
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        assert_eq!(text.matches("kind: Service\n").count(), 2);
        assert_eq!(text.matches("kind: EndpointSlice\n").count(), 2);
        assert!(text.contains("  clusterIP: 198.19.255.1\n"));
        assert!(text.contains("- addresses:\n  - 198.18.1.12\n"));
        assert!(text.contains("    targetPort: 5000\n"));
    }
}
