//! Services as the model keeps them: only the fields it reads, made once when an object
//! arrives (see [`Slice`](super::Slice) for the `EndpointSlice`s).
//!
//! A `k8s-openapi` `Service` is 824 bytes before its strings (its metadata and spec hold
//! every optional field of the API inline). A [`Svc`] keeps the fields the model and Services
//! over Pods read, with the API's names and shapes and the values as the API gave them
//! (validation and its errors stay in the model), so the code that reads them reads the same
//! paths.

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::{
    api::core::v1::{Service, ServicePort, ServiceSpec},
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

use super::{
    LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME,
    intern::{intern, intern_opt},
    pods::{ANNOTATION_TOPOLOGY_AWARE_HINTS, ANNOTATION_TOPOLOGY_MODE},
};

/// A `v1` Service, reduced to what the model reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Svc {
    /// `metadata`.
    pub metadata: SvcMeta,
    /// `spec`.
    pub spec: Option<SvcSpec>,
    /// `status.loadBalancer.ingress` (none when the Service has no such list).
    pub load_balancer_ingress: Option<Vec<SvcLbIngress>>,
}

/// One of a Service's `status.loadBalancer.ingress`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SvcLbIngress {
    /// `ip` (none for a load balancer named by `hostname` only).
    pub ip: Option<String>,
    /// `ipMode` (`VIP`, the default, or `Proxy`).
    pub ip_mode: Option<String>,
}

/// A Service's `metadata`: its identity and the labels and annotations the model reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SvcMeta {
    /// `namespace` (shared: see [`intern`](super::intern)).
    pub namespace: Option<Arc<str>>,
    /// `name`.
    pub name: Option<String>,
    /// `uid` (the Kubernetes source names it in Events).
    pub uid: Option<String>,
    /// Of `labels`, only `service.kubernetes.io/service-proxy-name` and
    /// `service.kubernetes.io/headless` (none when it has neither).
    pub labels: Option<BTreeMap<String, String>>,
    /// Of `annotations`, only the topology ones (none when it has neither).
    pub annotations: Option<BTreeMap<String, String>>,
}

/// A Service's `spec`, the fields the model reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SvcSpec {
    /// `type` (shared).
    pub type_: Option<Arc<str>>,
    /// `clusterIP`.
    pub cluster_ip: Option<String>,
    /// `clusterIPs`.
    pub cluster_ips: Option<Vec<String>>,
    /// `ipFamilies` (shared values).
    pub ip_families: Option<Vec<Arc<str>>>,
    /// `ports`.
    pub ports: Option<Vec<SvcPort>>,
    /// `internalTrafficPolicy` (shared).
    pub internal_traffic_policy: Option<Arc<str>>,
    /// `sessionAffinity` (shared).
    pub session_affinity: Option<Arc<str>>,
    /// `sessionAffinityConfig.clientIP.timeoutSeconds`.
    pub affinity_timeout_seconds: Option<i32>,
    /// `selector`.
    pub selector: Option<BTreeMap<String, String>>,
    /// `publishNotReadyAddresses`.
    pub publish_not_ready_addresses: Option<bool>,
    /// `trafficDistribution` (shared).
    pub traffic_distribution: Option<Arc<str>>,
    /// `externalIPs`.
    pub external_ips: Option<Vec<String>>,
    /// `externalTrafficPolicy` (shared).
    pub external_traffic_policy: Option<Arc<str>>,
    /// `healthCheckNodePort`.
    pub health_check_node_port: Option<i32>,
    /// `loadBalancerSourceRanges`.
    pub load_balancer_source_ranges: Option<Vec<String>>,
}

/// One of a Service's `ports`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SvcPort {
    /// `name` (shared).
    pub name: Option<Arc<str>>,
    /// `port`.
    pub port: i32,
    /// `protocol` (shared).
    pub protocol: Option<Arc<str>>,
    /// `nodePort`.
    pub node_port: Option<i32>,
    /// `targetPort`.
    pub target_port: Option<IntOrString>,
}

/// Of `map`, only the entries under `keys` (none when none is there).
fn only(map: Option<BTreeMap<String, String>>, keys: &[&str]) -> Option<BTreeMap<String, String>> {
    let mut map = map?;
    map.retain(|k, _| keys.contains(&k.as_str()));
    (!map.is_empty()).then_some(map)
}

impl From<Service> for Svc {
    /// Keeps what the model reads: the strings unique to the object are moved, the few-valued
    /// ones shared (see [`intern`](super::intern)).
    fn from(svc: Service) -> Self {
        Self {
            metadata: SvcMeta::from(svc.metadata),
            spec: svc.spec.map(SvcSpec::from),
            load_balancer_ingress: svc
                .status
                .and_then(|s| s.load_balancer)
                .and_then(|lb| lb.ingress)
                .map(|list| {
                    list.into_iter()
                        .map(|i| SvcLbIngress {
                            ip: i.ip,
                            ip_mode: i.ip_mode,
                        })
                        .collect()
                }),
        }
    }
}

impl From<&Service> for Svc {
    fn from(svc: &Service) -> Self {
        Self::from(svc.clone())
    }
}

impl From<ObjectMeta> for SvcMeta {
    fn from(meta: ObjectMeta) -> Self {
        Self {
            namespace: intern_opt(meta.namespace.as_deref()),
            name: meta.name,
            uid: meta.uid,
            labels: only(meta.labels, &[LABEL_SERVICE_PROXY_NAME, LABEL_HEADLESS]),
            annotations: only(
                meta.annotations,
                &[ANNOTATION_TOPOLOGY_AWARE_HINTS, ANNOTATION_TOPOLOGY_MODE],
            ),
        }
    }
}

impl From<ServiceSpec> for SvcSpec {
    fn from(spec: ServiceSpec) -> Self {
        Self {
            type_: intern_opt(spec.type_.as_deref()),
            cluster_ip: spec.cluster_ip,
            cluster_ips: spec.cluster_ips,
            ip_families: spec
                .ip_families
                .map(|list| list.iter().map(|f| intern(f)).collect()),
            ports: spec
                .ports
                .map(|ports| ports.into_iter().map(SvcPort::from).collect()),
            internal_traffic_policy: intern_opt(spec.internal_traffic_policy.as_deref()),
            session_affinity: intern_opt(spec.session_affinity.as_deref()),
            affinity_timeout_seconds: spec
                .session_affinity_config
                .and_then(|c| c.client_ip)
                .and_then(|c| c.timeout_seconds),
            selector: spec.selector,
            publish_not_ready_addresses: spec.publish_not_ready_addresses,
            traffic_distribution: intern_opt(spec.traffic_distribution.as_deref()),
            external_ips: spec.external_ips,
            external_traffic_policy: intern_opt(spec.external_traffic_policy.as_deref()),
            health_check_node_port: spec.health_check_node_port,
            load_balancer_source_ranges: spec.load_balancer_source_ranges,
        }
    }
}

impl From<ServicePort> for SvcPort {
    fn from(port: ServicePort) -> Self {
        Self {
            name: intern_opt(port.name.as_deref()),
            port: port.port,
            protocol: intern_opt(port.protocol.as_deref()),
            node_port: port.node_port,
            target_port: port.target_port,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_support::yaml;

    #[test]
    fn keeps_what_the_model_reads() {
        let svc: Service = yaml(
            "apiVersion: v1\nkind: Service\n\
             metadata:\n  name: web\n  namespace: shop\n  uid: u-1\n\
             \x20 labels: {app: web, service.kubernetes.io/headless: ''}\n\
             \x20 annotations: {kubectl.kubernetes.io/last-applied-configuration: '{}', \
             service.kubernetes.io/topology-mode: Auto}\n\
             spec:\n  type: NodePort\n  clusterIP: 198.19.0.1\n  clusterIPs: [198.19.0.1]\n\
             \x20 ipFamilies: [IPv4]\n  selector: {app: web}\n  sessionAffinity: ClientIP\n\
             \x20 sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n\
             \x20 internalTrafficPolicy: Local\n  publishNotReadyAddresses: true\n\
             \x20 trafficDistribution: PreferClose\n  externalName: x.example\n\
             \x20 ports: [{name: http, port: 80, protocol: TCP, nodePort: 30080, targetPort: http}]\n\
             \x20 externalIPs: [198.18.0.50]\n  externalTrafficPolicy: Local\n\
             \x20 healthCheckNodePort: 32000\n  loadBalancerSourceRanges: [198.18.0.0/24]\n\
             status:\n  loadBalancer:\n    ingress: [{ip: 198.18.0.60, ipMode: VIP}, {hostname: lb.example}]\n",
        );
        let one = |k: &str, v: &str| Some(BTreeMap::from([(k.to_owned(), v.to_owned())]));
        assert_eq!(
            Svc::from(&svc),
            Svc {
                metadata: SvcMeta {
                    namespace: Some("shop".into()),
                    name: Some("web".into()),
                    uid: Some("u-1".into()),
                    labels: one(LABEL_HEADLESS, ""),
                    annotations: one(ANNOTATION_TOPOLOGY_MODE, "Auto"),
                },
                spec: Some(SvcSpec {
                    type_: Some("NodePort".into()),
                    cluster_ip: Some("198.19.0.1".into()),
                    cluster_ips: Some(vec!["198.19.0.1".into()]),
                    ip_families: Some(vec!["IPv4".into()]),
                    ports: Some(vec![SvcPort {
                        name: Some("http".into()),
                        port: 80,
                        protocol: Some("TCP".into()),
                        node_port: Some(30080),
                        target_port: Some(IntOrString::String("http".into())),
                    }]),
                    internal_traffic_policy: Some("Local".into()),
                    session_affinity: Some("ClientIP".into()),
                    affinity_timeout_seconds: Some(60),
                    selector: one("app", "web"),
                    publish_not_ready_addresses: Some(true),
                    traffic_distribution: Some("PreferClose".into()),
                    external_ips: Some(vec!["198.18.0.50".into()]),
                    external_traffic_policy: Some("Local".into()),
                    health_check_node_port: Some(32000),
                    load_balancer_source_ranges: Some(vec!["198.18.0.0/24".into()]),
                }),
                load_balancer_ingress: Some(vec![
                    SvcLbIngress {
                        ip: Some("198.18.0.60".into()),
                        ip_mode: Some("VIP".into()),
                    },
                    SvcLbIngress::default(),
                ]),
            }
        );
        // Unread labels and annotations leave nothing behind.
        let mut plain = svc;
        plain.metadata.labels = Some(BTreeMap::from([("app".into(), "web".into())]));
        plain.metadata.annotations = None;
        let lean = Svc::from(plain);
        assert_eq!(
            (lean.metadata.labels, lean.metadata.annotations),
            (None, None)
        );
    }
}
