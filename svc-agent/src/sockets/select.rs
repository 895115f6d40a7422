//! Which connected UDP sockets to destroy: a pure function over the sockets a namespace holds,
//! the entries of `SOCK_REVNAT_V1` and what a reconcile pass ended.
//!
//! A socket is destroyed only when the connect-time programs sent it to a backend (its cookie
//! and its peer are a key of `SOCK_REVNAT_V1`, written when `connect()` chose that backend for
//! a service address) and that backend ended for that service: the `(service, backend)` pair
//! ended, or the backend was removed altogether. A socket an application connected to a pod
//! address on its own has no such entry and is never touched, whatever happened to the pod.

use std::{
    collections::{BTreeSet, HashSet},
    hash::BuildHasher,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use svc_common::{
    addr::{FAMILY_V4, FAMILY_V6, to_v4},
    sock::{SockRevNatKey, SockRevNatValue},
};

/// What a reconcile pass ended, in addresses (the sockets know no ids).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EndedBackends {
    /// `(service address and port, backend address and port)` of UDP frontends whose backend
    /// left them (or which went away themselves).
    pub pairs: BTreeSet<(SocketAddr, SocketAddr)>,
    /// Backends removed from `BACKENDS_V1`: ended for every service that had them.
    pub backends: BTreeSet<SocketAddr>,
}

impl EndedBackends {
    /// Whether nothing ended.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty() && self.backends.is_empty()
    }

    /// Adds what `other` ended (passes queued while a destroy pass ran are handled at once).
    pub fn merge(&mut self, other: Self) {
        self.pairs.extend(other.pairs);
        self.backends.extend(other.backends);
    }

    /// Whether a socket sent to `backend` for `service` must go.
    #[must_use]
    pub fn names(&self, service: SocketAddr, backend: SocketAddr) -> bool {
        self.backends.contains(&backend) || self.pairs.contains(&(service, backend))
    }
}

/// One `(socket, backend)` the connect-time programs created: an entry of `SOCK_REVNAT_V1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translated {
    /// The socket's cookie.
    pub cookie: u64,
    /// The backend the socket was sent to.
    pub backend: SocketAddr,
    /// The service address and port the process asked for.
    pub service: SocketAddr,
}

impl Translated {
    /// The entry as addresses; `None` for an unknown family.
    #[must_use]
    pub fn from_entry(key: &SockRevNatKey, value: &SockRevNatValue) -> Option<Self> {
        let ip = |addr: &[u8; 16]| -> Option<IpAddr> {
            match key.family {
                FAMILY_V4 => Some(Ipv4Addr::from(to_v4(addr)).into()),
                FAMILY_V6 => Some(Ipv6Addr::from(*addr).into()),
                _ => None,
            }
        };
        Some(Self {
            cookie: key.cookie,
            backend: SocketAddr::new(ip(&key.addr)?, key.port.to_host()),
            service: SocketAddr::new(ip(&value.addr)?, value.port.to_host()),
        })
    }
}

/// A connected UDP socket as `sock_diag` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpSock {
    /// Its cookie (the same number `bpf_get_socket_cookie` gives the programs).
    pub cookie: u64,
    /// Its own address and port.
    pub local: SocketAddr,
    /// The address and port it is connected to.
    pub peer: SocketAddr,
    /// What identifies it to `SOCK_DESTROY`, exactly as the dump reported it.
    pub id: netlink_packet_sock_diag::inet::SocketId,
}

/// The `(cookie, backend)` keys whose sockets must go: entries of `SOCK_REVNAT_V1` naming a
/// service and backend that `ended` names.
#[must_use]
pub fn doomed(
    entries: impl IntoIterator<Item = Translated>,
    ended: &EndedBackends,
) -> HashSet<(u64, SocketAddr)> {
    entries
        .into_iter()
        .filter(|t| ended.names(t.service, t.backend))
        .map(|t| (t.cookie, t.backend))
        .collect()
}

/// The sockets of `sockets` to destroy: those connected to exactly the backend a doomed entry
/// names, with that entry's cookie. A dual-stack socket's IPv4-mapped peer (`::ffff:a.b.c.d`)
/// is the IPv4 backend the programs recorded it as.
pub fn to_destroy<'a, 'd, S: BuildHasher>(
    sockets: &'a [UdpSock],
    doomed: &'d HashSet<(u64, SocketAddr), S>,
) -> impl Iterator<Item = &'a UdpSock> + use<'a, 'd, S> {
    sockets
        .iter()
        .filter(|s| doomed.contains(&(s.cookie, unmapped(s.peer))))
}

/// `addr` with an IPv4-mapped IPv6 address as the IPv4 address it maps.
fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().map_or(addr, |v4| {
            SocketAddr::new(std::net::IpAddr::V4(v4), v6.port())
        }),
        SocketAddr::V4(_) => addr,
    }
}

/// [`doomed`] then [`to_destroy`]: the selection as one function of the sockets, the entries of
/// `SOCK_REVNAT_V1` and what ended.
#[must_use]
pub fn select<'a>(
    sockets: &'a [UdpSock],
    entries: impl IntoIterator<Item = Translated>,
    ended: &EndedBackends,
) -> Vec<&'a UdpSock> {
    let doomed = doomed(entries, ended);
    to_destroy(sockets, &doomed).collect()
}

#[cfg(test)]
mod tests {
    use netlink_packet_sock_diag::inet::SocketId;
    use svc_common::{Be16, addr::from_v4};

    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    const VIP: &str = "198.19.0.10:53";
    const OTHER_VIP: &str = "198.19.0.11:53";
    const A: &str = "198.18.2.10:5353";
    const B: &str = "198.18.2.11:5353";

    fn sock(cookie: u64, peer: &str) -> UdpSock {
        let peer = sa(peer);
        let local = SocketAddr::new(sa("198.18.1.10:0").ip(), 40000);
        UdpSock {
            cookie,
            local,
            peer,
            id: SocketId {
                source_port: local.port(),
                destination_port: peer.port(),
                source_address: local.ip(),
                destination_address: peer.ip(),
                interface_id: 0,
                cookie: cookie.to_ne_bytes(),
            },
        }
    }

    fn t(cookie: u64, service: &str, backend: &str) -> Translated {
        Translated {
            cookie,
            backend: sa(backend),
            service: sa(service),
        }
    }

    #[test]
    fn only_translated_sockets_on_an_ended_pair_or_removed_backend_are_chosen() {
        let ended = EndedBackends {
            pairs: [(sa(VIP), sa(A))].into(),
            backends: [sa(B)].into(),
        };
        let sockets = [
            sock(1, A), // translated VIP -> A: the pair ended
            sock(2, A), // connected to A directly: no entry
            sock(3, B), // translated OTHER_VIP -> B: B removed
            sock(4, A), // translated OTHER_VIP -> A: that pair lives on
            sock(5, B), // its entry names A (it was re-connected to B since): no match
        ];
        let entries = [
            t(1, VIP, A),
            t(3, OTHER_VIP, B),
            t(4, OTHER_VIP, A),
            t(5, VIP, A),
            t(6, VIP, A), // a socket closed since (or in another namespace)
        ];
        let chosen: Vec<u64> = select(&sockets, entries, &ended)
            .iter()
            .map(|s| s.cookie)
            .collect();
        assert_eq!(chosen, [1, 3]);
        assert!(select(&sockets, entries, &EndedBackends::default()).is_empty());
    }

    #[test]
    fn an_unconnected_socket_with_several_backends_matches_only_on_its_peer() {
        // A socket that sent datagrams to A and B through the service before it was connected
        // (to B): only its current peer counts.
        let ended = EndedBackends {
            pairs: [(sa(VIP), sa(A))].into(),
            backends: BTreeSet::new(),
        };
        let entries = [t(7, VIP, A), t(7, VIP, B)];
        assert!(select(&[sock(7, B)], entries, &ended).is_empty());
        assert_eq!(select(&[sock(7, A)], entries, &ended).len(), 1);
    }

    #[test]
    fn map_entries_become_addresses_of_their_family() {
        let key = SockRevNatKey {
            cookie: 42,
            addr: from_v4([198, 18, 2, 10]),
            port: Be16::from_host(5353),
            family: FAMILY_V4,
            _pad: [0; 5],
        };
        let value = SockRevNatValue {
            addr: from_v4([198, 19, 0, 10]),
            port: Be16::from_host(53),
            _pad: 0,
        };
        assert_eq!(Translated::from_entry(&key, &value), Some(t(42, VIP, A)));
        let v6 = SockRevNatKey {
            family: FAMILY_V6,
            addr: "2001:db8:2::10".parse::<Ipv6Addr>().unwrap().octets(),
            ..key
        };
        let v6_value = SockRevNatValue {
            addr: "2001:db8:f::10".parse::<Ipv6Addr>().unwrap().octets(),
            ..value
        };
        assert_eq!(
            Translated::from_entry(&v6, &v6_value),
            Some(t(42, "[2001:db8:f::10]:53", "[2001:db8:2::10]:5353"))
        );
        let unknown = SockRevNatKey { family: 9, ..key };
        assert_eq!(Translated::from_entry(&unknown, &value), None);
    }

    #[test]
    fn a_dual_stack_socket_with_a_mapped_peer_matches_its_ipv4_entry() {
        let ended = EndedBackends {
            pairs: [(sa("198.19.0.10:53"), sa("198.18.2.10:5353"))].into(),
            ..EndedBackends::default()
        };
        let mapped = sock(7, "[::ffff:198.18.2.10]:5353");
        let chosen = select(
            std::slice::from_ref(&mapped),
            [t(7, "198.19.0.10:53", "198.18.2.10:5353")],
            &ended,
        );
        assert_eq!(chosen, vec![&mapped]);
    }

    #[test]
    fn merging_collects_both_passes() {
        let mut first = EndedBackends {
            pairs: [(sa(VIP), sa(A))].into(),
            backends: BTreeSet::new(),
        };
        first.merge(EndedBackends {
            pairs: BTreeSet::new(),
            backends: [sa(B)].into(),
        });
        assert!(first.names(sa(VIP), sa(A)) && first.names(sa(OTHER_VIP), sa(B)));
        assert!(!first.names(sa(OTHER_VIP), sa(A)));
        assert!(EndedBackends::default().is_empty() && !first.is_empty());
    }
}
