//! This node's addresses and zone, from its Node object.

use std::{borrow::Borrow, collections::BTreeSet, net::IpAddr};

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;

use super::{LABEL_TOPOLOGY_ZONE, ObjectError};

/// What kind of node address an address is (`status.addresses[].type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NodeAddressKind {
    /// `InternalIP`: reachable inside the cluster.
    InternalIp,
    /// `ExternalIP`: reachable from outside the cluster.
    ExternalIp,
}

/// One IP address of this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeAddress {
    /// The address.
    pub addr: IpAddr,
    /// Its kind.
    pub kind: NodeAddressKind,
}

/// The `InternalIP` and `ExternalIP` addresses of the Node named `node_name`, sorted and
/// deduplicated, and the errors found in that Node's addresses.
///
/// Other address types (`Hostname`, `InternalDNS`, ...) are not IPs and are skipped; an
/// unparseable IP is reported and skipped. No Node of that name gives no addresses and no
/// error (standalone mode may have no Node objects). Several differing Node objects of that
/// name give no addresses and an error, whatever their order. Only this node is checked.
#[must_use]
pub fn node_addresses<N: Borrow<Node>>(
    nodes: &[N],
    node_name: &str,
) -> (Vec<NodeAddress>, Vec<ObjectError>) {
    let mut errors = Vec::new();
    let node = match this_node(nodes, node_name) {
        Ok(Some(node)) => node,
        Ok(None) => return (Vec::new(), errors),
        Err(e) => {
            errors.push(e);
            return (Vec::new(), errors);
        }
    };

    let mut addresses = BTreeSet::new();
    let listed = node.status.as_ref().and_then(|s| s.addresses.as_deref());
    for (i, address) in listed.unwrap_or_default().iter().enumerate() {
        let kind = match address.type_.as_str() {
            "InternalIP" => NodeAddressKind::InternalIp,
            "ExternalIP" => NodeAddressKind::ExternalIp,
            _ => continue,
        };
        match address.address.parse::<IpAddr>() {
            Ok(addr) => {
                addresses.insert(NodeAddress { addr, kind });
            }
            Err(_) => errors.push(node_error(
                node_name,
                format!("status.addresses[{i}].address"),
                format!("{:?} is not an IP address", address.address),
            )),
        }
    }
    (addresses.into_iter().collect(), errors)
}

/// Which node addresses serve `NodePort`s (kube-proxy's `--nodeport-addresses`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// Every `InternalIP` and `ExternalIP` of the Node and every address of the node-facing
    /// interfaces (the flag's empty value).
    #[default]
    All,
    /// The Node's primary address of each family: its first `InternalIP` of the family in
    /// `status.addresses` order (its first `ExternalIP` when it has no `InternalIP` of the
    /// family), as kube-proxy's `primary`.
    Primary,
    /// The Node's and the node-facing interfaces' addresses inside any of these prefixes.
    Cidrs(Vec<IpNet>),
}

impl NodePortAddresses {
    /// Parses the flag's value: empty for [`Self::All`], `primary`, or comma-separated CIDRs
    /// (host bits cleared).
    ///
    /// # Errors
    /// Names the entry that is neither.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(Self::All);
        }
        if text == "primary" {
            return Ok(Self::Primary);
        }
        let mut cidrs = Vec::new();
        for part in text.split(',').map(str::trim) {
            match part.parse::<IpNet>() {
                Ok(net) => cidrs.push(net.trunc()),
                Err(_) => {
                    return Err(format!(
                        "{part:?} is not a CIDR (expected `primary` or comma-separated CIDRs \
                         such as 198.18.0.0/24,2001:db8::/64)"
                    ));
                }
            }
        }
        Ok(Self::Cidrs(cidrs))
    }
}

/// The node addresses that serve `NodePort`s under `which`, sorted and deduplicated: those of
/// the Node named `node_name` (errors in it are reported by [`node_addresses`]) and `host`, the
/// addresses of the node-facing interfaces (`hostaddrs`), as kube-proxy serves node ports on
/// the addresses of the node's interfaces. [`NodePortAddresses::Primary`] takes the Node's
/// primary addresses only; the others take both sources (no Node object: the interfaces'
/// addresses alone).
#[must_use]
pub fn nodeport_addresses<N: Borrow<Node>>(
    nodes: &[N],
    node_name: &str,
    which: &NodePortAddresses,
    host: &[IpAddr],
) -> Vec<IpAddr> {
    let node = this_node(nodes, node_name).ok().flatten();
    // In the Node's order, as (InternalIP, address).
    let listed: Vec<(bool, IpAddr)> = node
        .and_then(|node| node.status.as_ref())
        .and_then(|s| s.addresses.as_deref())
        .unwrap_or_default()
        .iter()
        .filter_map(|a| {
            let internal = match a.type_.as_str() {
                "InternalIP" => true,
                "ExternalIP" => false,
                _ => return None,
            };
            a.address.parse().ok().map(|ip| (internal, ip))
        })
        .collect();
    let both = || listed.iter().map(|&(_, ip)| ip).chain(host.iter().copied());
    let mut out: BTreeSet<IpAddr> = match which {
        NodePortAddresses::All => both().collect(),
        NodePortAddresses::Cidrs(cidrs) => both()
            .filter(|ip| cidrs.iter().any(|c| c.contains(ip)))
            .collect(),
        NodePortAddresses::Primary => [false, true]
            .into_iter()
            .filter_map(|v6| {
                let of_family = |internal: bool| {
                    listed
                        .iter()
                        .find(|&&(i, ip)| i == internal && ip.is_ipv6() == v6)
                        .map(|&(_, ip)| ip)
                };
                of_family(true).or_else(|| of_family(false))
            })
            .collect(),
    };
    out.retain(|ip| !ip.is_loopback() && !ip.is_unspecified());
    out.into_iter().collect()
}

/// The zone of the Node named `node_name`: its `topology.kubernetes.io/zone` label, `None`
/// when it has none (or an empty one), when there is no such Node, or when several differing
/// Node objects have that name (reported by [`node_addresses`]). Topology hints for zones are
/// ignored without a zone, as kube-proxy ignores them.
#[must_use]
pub fn node_zone<N: Borrow<Node>>(nodes: &[N], node_name: &str) -> Option<String> {
    let node = this_node(nodes, node_name).ok().flatten()?;
    node.metadata
        .labels
        .as_ref()?
        .get(LABEL_TOPOLOGY_ZONE)
        .filter(|zone| !zone.is_empty())
        .cloned()
}

/// The Node named `node_name`: `Ok(None)` when there is none, an error when several differing
/// Node objects have that name (whatever their order).
fn this_node<'a, N: Borrow<Node>>(
    nodes: &'a [N],
    node_name: &str,
) -> Result<Option<&'a Node>, ObjectError> {
    let mine: Vec<&Node> = nodes
        .iter()
        .map(Borrow::borrow)
        .filter(|n| !node_name.is_empty() && n.metadata.name.as_deref() == Some(node_name))
        .collect();
    let Some(&node) = mine.first() else {
        return Ok(None);
    };
    if mine.iter().any(|other| *other != node) {
        return Err(node_error(
            node_name,
            "metadata.name".to_owned(),
            format!(
                "{} Node objects have this name and they differ; all are ignored",
                mine.len()
            ),
        ));
    }
    Ok(Some(node))
}

fn node_error(name: &str, field: String, reason: String) -> ObjectError {
    ObjectError {
        kind: "Node",
        namespace: String::new(),
        name: name.to_owned(),
        field,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_support::yaml;

    const NODE1: &str = r#"
apiVersion: v1
kind: Node
metadata:
  labels:
    kubernetes.io/hostname: node1
    kubernetes.io/os: linux
  name: node1
  resourceVersion: "1234"
  uid: 1b3c1a8e-4d8e-4f4c-9a59-0c7b6c0a7e11
spec:
  podCIDR: 198.18.1.0/24
  podCIDRs:
  - 198.18.1.0/24
  - 2001:db8:1::/64
status:
  addresses:
  - address: 198.18.100.11
    type: InternalIP
  - address: 2001:db8:100::11
    type: InternalIP
  - address: 203.0.113.11
    type: ExternalIP
  - address: node1
    type: Hostname
  - address: node1.example.internal
    type: InternalDNS
  nodeInfo:
    architecture: amd64
    bootID: 7f6e5d4c
    containerRuntimeVersion: containerd://2.0.5
    kernelVersion: 6.12.0
    kubeProxyVersion: ""
    kubeletVersion: v1.33.1
    machineID: 0f1e2d3c
    operatingSystem: linux
    osImage: Debian GNU/Linux 13 (trixie)
    systemUUID: 0f1e2d3c
"#;

    const NODE2: &str = r"
apiVersion: v1
kind: Node
metadata:
  name: node2
status:
  addresses:
  - address: 198.18.100.12
    type: InternalIP
";

    fn addr(addr: &str, kind: NodeAddressKind) -> NodeAddress {
        NodeAddress {
            addr: addr.parse().unwrap(),
            kind,
        }
    }

    #[test]
    fn internal_and_external_ips_of_this_node_only() {
        let nodes: Vec<Node> = vec![yaml(NODE2), yaml(NODE1)];
        let (addresses, errors) = node_addresses(&nodes, "node1");
        assert_eq!(errors, []);
        assert_eq!(
            addresses,
            [
                addr("198.18.100.11", NodeAddressKind::InternalIp),
                addr("203.0.113.11", NodeAddressKind::ExternalIp),
                addr("2001:db8:100::11", NodeAddressKind::InternalIp),
            ]
        );
        let (addresses, _) = node_addresses(&nodes, "node2");
        assert_eq!(
            addresses,
            [addr("198.18.100.12", NodeAddressKind::InternalIp)]
        );
    }

    #[test]
    fn unknown_node_or_no_status_gives_nothing() {
        let nodes: Vec<Node> = vec![
            yaml(NODE1),
            yaml("apiVersion: v1\nkind: Node\nmetadata:\n  name: bare\n"),
        ];
        assert_eq!(node_addresses(&nodes, "node9"), (vec![], vec![]));
        assert_eq!(node_addresses(&nodes, "bare"), (vec![], vec![]));
        assert_eq!(node_addresses(&nodes, ""), (vec![], vec![]));
        assert_eq!(node_addresses::<Node>(&[], "node1"), (vec![], vec![]));
    }

    #[test]
    fn bad_address_is_reported_and_the_rest_kept() {
        let node: Node = yaml(
            r"
apiVersion: v1
kind: Node
metadata:
  name: node3
status:
  addresses:
  - address: 198.18.100.300
    type: InternalIP
  - address: 198.18.100.13
    type: InternalIP
",
        );
        let (addresses, errors) = node_addresses(&[node], "node3");
        assert_eq!(
            addresses,
            [addr("198.18.100.13", NodeAddressKind::InternalIp)]
        );
        assert_eq!(errors.len(), 1);
        assert_eq!(
            errors[0].to_string(),
            "Node node3: status.addresses[0].address: \"198.18.100.300\" is not an IP address"
        );
    }

    #[test]
    fn zone_comes_from_the_topology_label_of_this_node_only() {
        let zoned: Node = yaml(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: node1\n  labels:\n    \
             topology.kubernetes.io/zone: zone-a\n",
        );
        let empty: Node = yaml(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: node3\n  labels:\n    \
             topology.kubernetes.io/zone: \"\"\n",
        );
        let nodes = vec![zoned.clone(), yaml(NODE2), empty];
        assert_eq!(node_zone(&nodes, "node1").as_deref(), Some("zone-a"));
        assert_eq!(node_zone(&nodes, "node2"), None, "no label");
        assert_eq!(
            node_zone(&nodes, "node3"),
            None,
            "an empty label is no zone"
        );
        assert_eq!(node_zone(&nodes, "node9"), None, "no such Node");
        let mut other = zoned.clone();
        other.metadata.uid = Some("another".to_owned());
        assert_eq!(
            node_zone(&[zoned, other], "node1"),
            None,
            "differing duplicates: no zone"
        );
    }

    #[test]
    fn identical_duplicates_merge_and_differing_ones_are_rejected() {
        let same: Vec<Node> = vec![yaml(NODE1), yaml(NODE1)];
        assert_eq!(node_addresses(&same, "node1").0.len(), 3);

        let mut other: Node = yaml(NODE1);
        other.status = None;
        for nodes in [vec![yaml(NODE1), other.clone()], vec![other, yaml(NODE1)]] {
            let (addresses, errors) = node_addresses(&nodes, "node1");
            assert_eq!(addresses, []);
            assert_eq!(errors.len(), 1);
            assert_eq!(errors[0].field, "metadata.name");
        }
    }

    #[test]
    fn nodeport_addresses_follow_the_flag() {
        let nodes: Vec<Node> = vec![yaml(NODE2), yaml(NODE1)];
        let ips =
            |list: &[&str]| -> Vec<IpAddr> { list.iter().map(|a| a.parse().unwrap()).collect() };
        let all = NodePortAddresses::parse("").unwrap();
        assert_eq!(
            nodeport_addresses(&nodes, "node1", &all, &[]),
            ips(&["198.18.100.11", "203.0.113.11", "2001:db8:100::11"])
        );
        let primary = NodePortAddresses::parse("primary").unwrap();
        assert_eq!(
            nodeport_addresses(&nodes, "node1", &primary, &[]),
            ips(&["198.18.100.11", "2001:db8:100::11"])
        );
        let cidrs = NodePortAddresses::parse(" 203.0.113.1/24 , 2001:db8::/32").unwrap();
        assert_eq!(
            cidrs,
            NodePortAddresses::Cidrs(vec![
                "203.0.113.0/24".parse().unwrap(),
                "2001:db8::/32".parse().unwrap()
            ])
        );
        assert_eq!(
            nodeport_addresses(&nodes, "node1", &cidrs, &[]),
            ips(&["203.0.113.11", "2001:db8:100::11"])
        );
        assert_eq!(nodeport_addresses(&nodes, "node9", &all, &[]), ips(&[]));

        // The node-facing interfaces' addresses join the Node's, except under `primary`; the
        // CIDRs narrow both; without a Node object they are all there is.
        let host = ips(&["198.18.100.11", "198.18.7.1", "2001:db8:7::1"]);
        assert_eq!(
            nodeport_addresses(&nodes, "node1", &all, &host),
            ips(&[
                "198.18.7.1",
                "198.18.100.11",
                "203.0.113.11",
                "2001:db8:7::1",
                "2001:db8:100::11"
            ])
        );
        assert_eq!(
            nodeport_addresses(&nodes, "node1", &primary, &host),
            ips(&["198.18.100.11", "2001:db8:100::11"])
        );
        let narrow = NodePortAddresses::parse("198.18.7.0/24,2001:db8:100::/64").unwrap();
        assert_eq!(
            nodeport_addresses(&nodes, "node1", &narrow, &host),
            ips(&["198.18.7.1", "2001:db8:100::11"])
        );
        assert_eq!(
            nodeport_addresses(&nodes, "node9", &all, &host),
            ips(&["198.18.7.1", "198.18.100.11", "2001:db8:7::1"])
        );
        assert_eq!(
            nodeport_addresses(&nodes, "node9", &primary, &host),
            ips(&[])
        );
        let err = NodePortAddresses::parse("198.18.0.0/24,eth0").unwrap_err();
        assert!(err.contains("\"eth0\" is not a CIDR"), "{err}");
    }
}
