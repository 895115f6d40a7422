//! The addresses of the node-facing interfaces (`--node-ifaces`), followed with rtnetlink: with
//! the Node object's `InternalIP`s and `ExternalIP`s they are the node addresses `NodePort`s
//! serve (narrowed by `--nodeport-addresses`, see [`model::nodeport_addresses`]), as
//! kube-proxy serves node ports on the addresses of the node's interfaces.
//!
//! **Which addresses count**: every address of an interface whose name matches
//! `--node-ifaces` (and not only `--pod-ifaces`), except loopback, unspecified, multicast and
//! link-local ones (`169.254.0.0/16`, `fe80::/10`: not routable to the node from elsewhere).
//! For an IPv4 point-to-point address, the local end (`IFA_LOCAL`).
//!
//! **How they are followed**: a task joins the link and both address groups
//! (`RTNLGRP_LINK`, `RTNLGRP_IPV4_IFADDR`, `RTNLGRP_IPV6_IFADDR`) and, after any event (a
//! burst is taken together, [`SETTLE`] after its first event) or lost events, lists links and
//! addresses again and computes the set from scratch: a node has few addresses, and a listing
//! cannot drift the way applying single events can. The set goes out on a `watch` channel
//! only when it changed; the sources hand it to the model, which recomputes only the Services
//! with node ports.

use std::{collections::BTreeMap, net::IpAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use futures_util::{FutureExt as _, StreamExt as _, TryStreamExt as _};
use rtnetlink::{
    Handle, MulticastGroup,
    packet_core::NetlinkPayload,
    packet_route::address::{AddressAttribute, AddressMessage},
    proto::sys::AsyncSocket as _,
};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::ifaces::{IfaceRole, RolePatterns, list_links};
#[cfg(doc)]
use crate::model;

/// How long after the first event of a burst the addresses are listed again.
pub const SETTLE: Duration = Duration::from_millis(50);

/// How long to wait before listing again after a listing failed.
const RETRY: Duration = Duration::from_secs(1);

/// The addresses of the node-facing interfaces, sorted and deduplicated.
pub type HostAddresses = Arc<Vec<IpAddr>>;

/// Whether `ip` can be a node address `NodePort`s serve (see the [module docs](self)).
#[must_use]
pub fn eligible(ip: IpAddr) -> bool {
    if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
        return false;
    }
    match ip {
        IpAddr::V4(v4) => !v4.is_link_local(),
        IpAddr::V6(v6) => !v6.is_unicast_link_local() && v6.to_ipv4_mapped().is_none(),
    }
}

/// The eligible addresses of the interfaces `patterns` calls node-facing: `links` is
/// `ifindex -> name`, `addresses` is `(ifindex, address)`. Sorted, deduplicated.
#[must_use]
pub fn node_facing_addresses(
    links: &BTreeMap<u32, String>,
    addresses: &[(u32, IpAddr)],
    patterns: &RolePatterns,
) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = addresses
        .iter()
        .filter(|(index, _)| {
            links
                .get(index)
                .is_some_and(|name| patterns.classify(name).0 == Some(IfaceRole::NodeFacing))
        })
        .map(|&(_, ip)| ip)
        .filter(|&ip| eligible(ip))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// `(ifindex, address)` of an address message: `IFA_LOCAL` when present (the local end of an
/// IPv4 point-to-point address), else `IFA_ADDRESS`.
fn address_of(msg: &AddressMessage) -> Option<(u32, IpAddr)> {
    let find = |want_local: bool| {
        msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(ip) if want_local => Some(*ip),
            AddressAttribute::Address(ip) if !want_local => Some(*ip),
            _ => None,
        })
    };
    find(true)
        .or_else(|| find(false))
        .map(|ip| (msg.header.index, ip))
}

/// Lists links and addresses once and computes the node-facing addresses.
async fn list(handle: &Handle, patterns: &RolePatterns) -> anyhow::Result<Vec<IpAddr>> {
    let links: BTreeMap<u32, String> = list_links(handle).await?.into_iter().collect();
    let messages: Vec<AddressMessage> = handle
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .context("listing addresses (RTM_GETADDR dump)")?;
    let addresses: Vec<(u32, IpAddr)> = messages.iter().filter_map(address_of).collect();
    Ok(node_facing_addresses(&links, &addresses, patterns))
}

/// The addresses of this network namespace's node-facing interfaces now (one listing, no
/// watch): what `inspect diff` compares with.
///
/// # Errors
/// When netlink cannot be opened or a listing fails.
pub async fn current(patterns: &RolePatterns) -> anyhow::Result<Vec<IpAddr>> {
    let (conn, handle, _) = rtnetlink::new_connection().context("opening an rtnetlink socket")?;
    let task = tokio::spawn(conn);
    let listed = list(&handle, patterns).await;
    task.abort();
    listed
}

/// Starts following the node-facing interfaces' addresses of the calling thread's network
/// namespace (see the [module docs](self)): the receiver holds the first listing's set when
/// this returns, and every later change. The task ends when every receiver is gone; if
/// netlink fails for good it logs why and the last set stays.
///
/// # Errors
/// When the groups cannot be joined or the first listing fails.
pub async fn follow(patterns: RolePatterns) -> anyhow::Result<watch::Receiver<HostAddresses>> {
    let groups = [
        MulticastGroup::Link,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv6Ifaddr,
    ];
    let (mut conn, _, mut events) = rtnetlink::new_multicast_connection(&groups)
        .context("joining the rtnetlink link and address groups")?;
    // Events are only a cue to list again; a lost one is an overrun, which lists again too.
    let _ = conn.socket_mut().socket_ref().set_rx_buf_sz(1 << 20);
    let events_task = tokio::spawn(conn);
    let (conn, handle, _) = rtnetlink::new_connection().context("opening an rtnetlink socket")?;
    let requests_task = tokio::spawn(conn);
    let first = list(&handle, &patterns).await?;
    info!(addresses = %join(&first), "node-facing interface addresses (NodePorts serve them too)");
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        loop {
            if tx.is_closed() {
                break;
            }
            let Some((msg, _)) = events.next().await else {
                warn!(
                    "the rtnetlink address event connection closed: node-facing interface addresses are no longer followed"
                );
                break;
            };
            if !matches!(
                msg.payload,
                NetlinkPayload::InnerMessage(_) | NetlinkPayload::Overrun(_)
            ) {
                continue;
            }
            // Take the rest of the burst with this one.
            tokio::time::sleep(SETTLE).await;
            while let Some(Some(_)) = events.next().now_or_never() {}
            let listed = loop {
                match list(&handle, &patterns).await {
                    Ok(listed) => break listed,
                    Err(e) => {
                        warn!(error = %format!("{e:#}"), "listing the node-facing interfaces' addresses failed; again in 1 s");
                        tokio::time::sleep(RETRY).await;
                    }
                }
            };
            tx.send_if_modified(|current| {
                if **current == listed {
                    return false;
                }
                info!(from = %join(current), to = %join(&listed), "node-facing interface addresses changed");
                *current = Arc::new(listed);
                true
            });
        }
        events_task.abort();
        requests_task.abort();
    });
    Ok(rx)
}

/// `a,b,c` (`-` when empty), for logs.
fn join(addresses: &[IpAddr]) -> String {
    if addresses.is_empty() {
        return "-".to_owned();
    }
    addresses
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use rtnetlink::packet_route::{AddressFamily, address::AddressMessage};

    use super::*;
    use crate::loader::IfacePatterns;

    fn patterns() -> RolePatterns {
        RolePatterns::new(
            IfacePatterns::parse("veth*,eth9").unwrap(),
            IfacePatterns::parse_or_none("eth*,bond*").unwrap(),
        )
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn only_node_facing_interfaces_count() {
        let links: BTreeMap<u32, String> = [
            (1, "lo"),
            (2, "eth0"),
            (3, "veth1"),
            (4, "bond0"),
            (5, "eth9"), // both lists: node-facing
            (6, "docker0"),
        ]
        .into_iter()
        .map(|(i, n)| (i, n.to_owned()))
        .collect();
        let addresses = [
            (1, ip("127.0.0.1")),
            (2, ip("198.18.0.2")),
            (2, ip("2001:db8::2")),
            (3, ip("198.18.9.1")),
            (4, ip("198.19.0.7")),
            (5, ip("198.18.5.5")),
            (6, ip("198.18.6.6")),
            (7, ip("198.18.7.7")), // no such link (raced away)
            (4, ip("198.19.0.7")), // twice
        ];
        assert_eq!(
            node_facing_addresses(&links, &addresses, &patterns()),
            ["198.18.0.2", "198.18.5.5", "198.19.0.7", "2001:db8::2"].map(ip)
        );
    }

    #[test]
    fn link_local_loopback_and_multicast_never_count() {
        for bad in [
            "127.0.0.1",
            "0.0.0.0",
            "169.254.1.1",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "ff02::1",
            "::ffff:198.18.0.1",
        ] {
            assert!(!eligible(ip(bad)), "{bad}");
        }
        for good in ["198.18.0.1", "10.0.0.1", "2001:db8::1", "fd00::1"] {
            assert!(eligible(ip(good)), "{good}");
        }
    }

    #[test]
    fn the_local_end_of_a_point_to_point_address_counts() {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.index = 3;
        msg.attributes
            .push(AddressAttribute::Address(ip("198.18.0.9")));
        msg.attributes
            .push(AddressAttribute::Local(ip("198.18.0.1")));
        assert_eq!(address_of(&msg), Some((3, ip("198.18.0.1"))));
        let mut v6 = AddressMessage::default();
        v6.header.index = 4;
        v6.attributes
            .push(AddressAttribute::Address(ip("2001:db8::4")));
        assert_eq!(address_of(&v6), Some((4, ip("2001:db8::4"))));
        assert_eq!(address_of(&AddressMessage::default()), None);
    }
}
