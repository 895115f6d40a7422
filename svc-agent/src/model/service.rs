//! Validating a Service into the parts the model uses.

use std::{net::IpAddr, time::Duration};

use ipnet::IpNet;

use super::{
    LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME, ObjectError, Protocol, namespace_of,
    svc::{Svc, SvcLbIngress, SvcPort, SvcSpec},
};

/// `sessionAffinityConfig.clientIP.timeoutSeconds` when the Service sets none.
pub(crate) const DEFAULT_AFFINITY_TIMEOUT_SECONDS: i32 = 10_800;
/// The largest valid `sessionAffinityConfig.clientIP.timeoutSeconds` (one day).
pub(crate) const MAX_AFFINITY_TIMEOUT_SECONDS: i32 = 86_400;

/// `internalTrafficPolicy` / `externalTrafficPolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TrafficPolicy {
    /// Any endpoint in the cluster (the default).
    Cluster,
    /// Only endpoints on this node.
    Local,
}

/// `spec.type`, for a Service the dataplane serves (`ExternalName` is DNS only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ServiceType {
    /// `ClusterIP` (the default).
    ClusterIp,
    /// `NodePort`: also on every node address at each port's `nodePort`.
    NodePort,
    /// `LoadBalancer`: as `NodePort`, and on the load balancer's ingress IPs.
    LoadBalancer,
}

/// A validated Service that has virtual IPs to program.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ServiceView<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    /// The `ClusterIP`s (one per family), in the order of the Service.
    pub cluster_ips: Vec<IpAddr>,
    /// The addresses came from `spec.clusterIPs` (else from `spec.clusterIP`).
    pub cluster_ips_listed: bool,
    /// `spec.ipFamilies` as (IPv4 listed, IPv6 listed); `None` when the Service has no such
    /// list (every `ClusterIP` is served, as before dual-stack).
    pub ip_families: Option<(bool, bool)>,
    pub ports: Vec<PortView<'a>>,
    pub internal_traffic_policy: TrafficPolicy,
    pub affinity_timeout: Option<Duration>,
    pub type_: ServiceType,
    /// `spec.externalIPs`, with their index.
    pub external_ips: Vec<(usize, IpAddr)>,
    /// `status.loadBalancer.ingress[].ip` of a `LoadBalancer` whose `ipMode` is not `Proxy`
    /// (with `Proxy` the load balancer delivers to the node, which must not capture the IP),
    /// with their index.
    pub lb_ips: Vec<(usize, IpAddr)>,
    /// `spec.loadBalancerSourceRanges` (host bits cleared); empty: every client.
    pub source_ranges: Vec<IpNet>,
    pub external_traffic_policy: TrafficPolicy,
    /// `spec.healthCheckNodePort` (0 or absent: none).
    pub health_check_node_port: Option<u16>,
}

/// A validated Service port.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct PortView<'a> {
    /// Index in `spec.ports`, for error messages.
    pub index: usize,
    /// Empty for an unnamed port.
    pub name: &'a str,
    pub port: u16,
    pub proto: Protocol,
    /// `nodePort` (absent or 0: none).
    pub node_port: Option<u16>,
}

impl<'a> ServiceView<'a> {
    /// Validates `svc`. `None` when it has nothing to program (ignored, headless,
    /// `ExternalName`, no `ClusterIP`) or when it is invalid; then one error per bad field is
    /// pushed onto `errors`.
    pub(crate) fn parse(svc: &'a Svc, errors: &mut Vec<ObjectError>) -> Option<Self> {
        let labels = svc.metadata.labels.as_ref();
        if labels.is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME)) {
            // Belongs to another proxy (kube-proxy skips these the same way).
            return None;
        }
        if labels.is_some_and(|l| l.contains_key(LABEL_HEADLESS)) {
            return None;
        }
        let spec = svc.spec.as_ref()?;
        let namespace = namespace_of(svc.metadata.namespace.as_deref());
        let name = svc.metadata.name.as_deref().unwrap_or_default();
        let mut checker = Checker {
            namespace,
            name,
            errors,
            failed: false,
        };
        if name.is_empty() {
            checker.fail("metadata.name".to_owned(), "missing".to_owned());
        }

        let type_ = match spec.type_.as_deref() {
            None | Some("ClusterIP") => ServiceType::ClusterIp,
            Some("NodePort") => ServiceType::NodePort,
            Some("LoadBalancer") => ServiceType::LoadBalancer,
            Some("ExternalName") => return None, // DNS only.
            Some(other) => {
                checker.fail(
                    "spec.type".to_owned(),
                    format!(
                        "unknown type {other:?} (expected ClusterIP, NodePort, LoadBalancer or \
                         ExternalName)"
                    ),
                );
                ServiceType::ClusterIp
            }
        };

        let (cluster_ips, cluster_ips_listed) = checker.cluster_ips(spec)?;
        let ip_families = checker.ip_families(spec);
        let ports = spec
            .ports
            .as_deref()
            .unwrap_or_default()
            .iter()
            .enumerate()
            .filter_map(|(index, port)| checker.port(index, port))
            .collect::<Vec<_>>();
        checker.duplicate_ports(&ports);
        let internal_traffic_policy = checker.traffic_policy(
            "spec.internalTrafficPolicy",
            spec.internal_traffic_policy.as_deref(),
        );
        let affinity_timeout = checker.affinity(spec);
        let external_traffic_policy = checker.traffic_policy(
            "spec.externalTrafficPolicy",
            spec.external_traffic_policy.as_deref(),
        );
        let external_ips = checker.addresses(
            "spec.externalIPs",
            spec.external_ips.as_deref().unwrap_or_default(),
        );
        let lb_ips = if type_ == ServiceType::LoadBalancer {
            checker.lb_ips(svc.load_balancer_ingress.as_deref().unwrap_or_default())
        } else {
            Vec::new()
        };
        let source_ranges = checker.source_ranges(
            spec.load_balancer_source_ranges
                .as_deref()
                .unwrap_or_default(),
        );
        let health_check_node_port =
            checker.optional_port("spec.healthCheckNodePort", spec.health_check_node_port);

        if checker.failed {
            return None;
        }
        Some(Self {
            namespace,
            name,
            cluster_ips,
            cluster_ips_listed,
            ip_families,
            ports,
            internal_traffic_policy,
            affinity_timeout,
            type_,
            external_ips,
            lb_ips,
            source_ranges,
            external_traffic_policy,
            health_check_node_port,
        })
    }

    /// Whether the Service is served on node addresses at its ports' `nodePort`s.
    pub(crate) fn has_node_ports(&self) -> bool {
        matches!(
            self.type_,
            ServiceType::NodePort | ServiceType::LoadBalancer
        )
    }

    /// Whether `addr`, one of `cluster_ips`, is served: its family is in `spec.ipFamilies`, or
    /// the Service lists no families. kube-proxy programs a `ClusterIP` only for a family the
    /// Service lists (`GetClusterIPByFamily`): an address of another family (left by a changed
    /// `ipFamilyPolicy`, or written by hand) is not served.
    pub(crate) fn serves(&self, addr: IpAddr) -> bool {
        self.ip_families
            .is_none_or(|(v4, v6)| if addr.is_ipv4() { v4 } else { v6 })
    }

    /// The field the `index`th of `cluster_ips` came from.
    pub(crate) fn cluster_ip_field(&self, index: usize) -> super::ClaimField {
        if self.cluster_ips_listed {
            super::ClaimField::ClusterIps(index)
        } else {
            super::ClaimField::ClusterIp
        }
    }
}

fn service_error(namespace: &str, name: &str, field: String, reason: String) -> ObjectError {
    ObjectError {
        kind: "Service",
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        field,
        reason,
    }
}

/// Collects the errors of one Service and remembers whether there was any.
struct Checker<'e, 'a> {
    namespace: &'a str,
    name: &'a str,
    errors: &'e mut Vec<ObjectError>,
    failed: bool,
}

impl Checker<'_, '_> {
    fn fail(&mut self, field: String, reason: String) {
        self.failed = true;
        self.errors
            .push(service_error(self.namespace, self.name, field, reason));
    }

    /// The `ClusterIP`s: `spec.clusterIPs`, or `spec.clusterIP` when that list is empty.
    /// `None` when the Service has none (headless `None`, or not allocated: empty), so there
    /// is nothing to program and nothing else worth checking.
    fn cluster_ips(&mut self, spec: &SvcSpec) -> Option<(Vec<IpAddr>, bool)> {
        let list = spec.cluster_ips.as_deref().unwrap_or_default();
        let single = spec.cluster_ip.as_deref().unwrap_or_default();
        let listed = !list.is_empty();
        let raw: Vec<&str> = if listed {
            list.iter().map(String::as_str).collect()
        } else {
            vec![single]
        };
        let first = raw.first().copied().unwrap_or_default();
        if first.is_empty() || first == "None" {
            return None;
        }
        if listed && !single.is_empty() && single != first {
            self.fail(
                "spec.clusterIP".to_owned(),
                format!("{single:?} must equal spec.clusterIPs[0] ({first:?})"),
            );
        }
        let mut ips: Vec<IpAddr> = Vec::with_capacity(raw.len());
        for (i, text) in raw.iter().enumerate() {
            let field = if listed {
                format!("spec.clusterIPs[{i}]")
            } else {
                "spec.clusterIP".to_owned()
            };
            match text.parse::<IpAddr>() {
                Ok(ip) if ips.iter().any(|seen| seen.is_ipv4() == ip.is_ipv4()) => self.fail(
                    field,
                    format!("{text:?}: at most one address per IP family"),
                ),
                Ok(ip) if ip.is_unspecified() || ip.is_multicast() => {
                    self.fail(field, format!("{text:?} cannot be a service address"));
                }
                Ok(ip) => ips.push(ip),
                Err(_) => self.fail(field, format!("{text:?} is not an IP address")),
            }
        }
        Some((ips, listed))
    }

    /// `spec.ipFamilies` as (IPv4 listed, IPv6 listed); `None` when absent or empty. An
    /// unknown family is an error.
    fn ip_families(&mut self, spec: &SvcSpec) -> Option<(bool, bool)> {
        let list = spec.ip_families.as_deref().filter(|l| !l.is_empty())?;
        let (mut v4, mut v6) = (false, false);
        for (i, family) in list.iter().enumerate() {
            match &**family {
                "IPv4" => v4 = true,
                "IPv6" => v6 = true,
                other => self.fail(
                    format!("spec.ipFamilies[{i}]"),
                    format!("unknown IP family {other:?} (expected IPv4 or IPv6)"),
                ),
            }
        }
        Some((v4, v6))
    }

    fn port<'p>(&mut self, index: usize, port: &'p SvcPort) -> Option<PortView<'p>> {
        let field = |name: &str| format!("spec.ports[{index}].{name}");
        let number = u16::try_from(port.port).ok().filter(|&p| p != 0);
        if number.is_none() {
            self.fail(field("port"), format!("{} is not in 1..=65535", port.port));
        }
        let proto = match port.protocol.as_deref() {
            None => Some(Protocol::Tcp),
            Some(name) => Protocol::from_k8s(name),
        };
        if proto.is_none() {
            self.fail(
                field("protocol"),
                format!(
                    "unknown protocol {:?} (expected TCP, UDP or SCTP)",
                    port.protocol.as_deref().unwrap_or_default()
                ),
            );
        }
        // 0 means "not allocated" (the API server allocates one for NodePort Services).
        let node_port = self.optional_port(&field("nodePort"), port.node_port);
        Some(PortView {
            index,
            name: port.name.as_deref().unwrap_or_default(),
            port: number?,
            proto: proto?,
            node_port,
        })
    }

    /// Port numbers must be unique per protocol and names unique (slices match by name).
    fn duplicate_ports(&mut self, ports: &[PortView<'_>]) {
        for (i, port) in ports.iter().enumerate() {
            let earlier = &ports[..i];
            if let Some(first) = earlier
                .iter()
                .find(|p| p.port == port.port && p.proto == port.proto)
            {
                self.fail(
                    format!("spec.ports[{}]", port.index),
                    format!(
                        "duplicate port {}/{} (also spec.ports[{}])",
                        port.port, port.proto, first.index
                    ),
                );
            }
            if let Some(first) = earlier.iter().find(|p| p.name == port.name) {
                self.fail(
                    format!("spec.ports[{}].name", port.index),
                    format!(
                        "duplicate port name {:?} (also spec.ports[{}])",
                        port.name, first.index
                    ),
                );
            }
        }
    }

    /// A port number that may be unset: absent or 0 is `None`; outside 1..=65535 an error
    /// (and `None`).
    fn optional_port(&mut self, field: &str, value: Option<i32>) -> Option<u16> {
        match value {
            None | Some(0) => None,
            Some(n) => {
                let port = u16::try_from(n).ok();
                if port.is_none() {
                    self.fail(field.to_owned(), format!("{n} is not in 1..=65535"));
                }
                port
            }
        }
    }

    /// A list of addresses (`spec.externalIPs`), with their index; each must be a unicast IP.
    fn addresses(&mut self, field: &str, list: &[String]) -> Vec<(usize, IpAddr)> {
        let mut out = Vec::with_capacity(list.len());
        for (i, text) in list.iter().enumerate() {
            if let Some(ip) = self.unicast(format!("{field}[{i}]"), text) {
                out.push((i, ip));
            }
        }
        out
    }

    /// `text` as a unicast IP address, or an error on `field`.
    fn unicast(&mut self, field: String, text: &str) -> Option<IpAddr> {
        match text.parse::<IpAddr>() {
            Ok(ip) if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() => {
                self.fail(field, format!("{text:?} cannot be a service address"));
                None
            }
            Ok(ip) => Some(ip),
            Err(_) => {
                self.fail(field, format!("{text:?} is not an IP address"));
                None
            }
        }
    }

    /// The load balancer's ingress IPs the node captures: those whose `ipMode` is `VIP` (or
    /// unset); `Proxy` ones are skipped, entries with only a `hostname` too.
    fn lb_ips(&mut self, ingress: &[SvcLbIngress]) -> Vec<(usize, IpAddr)> {
        let mut out = Vec::new();
        for (i, entry) in ingress.iter().enumerate() {
            let field = |name: &str| format!("status.loadBalancer.ingress[{i}].{name}");
            let capture = match entry.ip_mode.as_deref() {
                None | Some("VIP") => true,
                Some("Proxy") => false,
                Some(other) => {
                    self.fail(
                        field("ipMode"),
                        format!("unknown ipMode {other:?} (expected VIP or Proxy)"),
                    );
                    false
                }
            };
            let Some(text) = entry.ip.as_deref().filter(|t| !t.is_empty()) else {
                continue;
            };
            if let Some(ip) = self.unicast(field("ip"), text)
                && capture
            {
                out.push((i, ip));
            }
        }
        out
    }

    /// `spec.loadBalancerSourceRanges` as prefixes (surrounding spaces allowed, as kube-proxy
    /// allows them; host bits cleared).
    fn source_ranges(&mut self, list: &[String]) -> Vec<IpNet> {
        let mut out = Vec::with_capacity(list.len());
        for (i, text) in list.iter().enumerate() {
            match text.trim().parse::<IpNet>() {
                Ok(net) => out.push(net.trunc()),
                Err(_) => self.fail(
                    format!("spec.loadBalancerSourceRanges[{i}]"),
                    format!("{text:?} is not an IP prefix (CIDR)"),
                ),
            }
        }
        out.sort();
        out.dedup();
        out
    }

    fn traffic_policy(&mut self, field: &str, value: Option<&str>) -> TrafficPolicy {
        match value {
            None | Some("Cluster") => TrafficPolicy::Cluster,
            Some("Local") => TrafficPolicy::Local,
            Some(other) => {
                self.fail(
                    field.to_owned(),
                    format!("unknown policy {other:?} (expected Cluster or Local)"),
                );
                TrafficPolicy::Cluster
            }
        }
    }

    fn affinity(&mut self, spec: &SvcSpec) -> Option<Duration> {
        match spec.session_affinity.as_deref() {
            None | Some("None") => None,
            Some("ClientIP") => {
                let seconds = spec
                    .affinity_timeout_seconds
                    .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECONDS);
                if (1..=MAX_AFFINITY_TIMEOUT_SECONDS).contains(&seconds) {
                    Some(Duration::from_secs(seconds.unsigned_abs().into()))
                } else {
                    self.fail(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds".to_owned(),
                        format!("{seconds} is not in 1..={MAX_AFFINITY_TIMEOUT_SECONDS}"),
                    );
                    None
                }
            }
            Some(other) => {
                self.fail(
                    "spec.sessionAffinity".to_owned(),
                    format!("unknown session affinity {other:?} (expected None or ClientIP)"),
                );
                None
            }
        }
    }
}
