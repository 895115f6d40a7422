//! Connect-time translation state (cgroup `sock_addr` programs): reverse-translation entries per
//! socket, and the backend each UDP socket was given per service.
//!
//! Map `SOCK_REVNAT_V1` (LRU hash; written by the `connect4/6` and `sendmsg4/6` programs when
//! they send a socket to a backend, read by `getpeername4/6` and `recvmsg4/6`, never written by
//! the agent, which reads it to find the connected UDP sockets of ended backends and destroy
//! them). Key [`SockRevNatKey`]: the socket (its cookie) and the backend it was sent to;
//! value [`SockRevNatValue`]: the service address and port the process asked for, which
//! `getpeername()` and `recvfrom()` report instead of the backend's. Entries are not removed
//! when a socket closes: socket cookies are never reused while the machine runs, so a stale
//! entry matches nothing and the LRU evicts it.
//! Map `SOCK_UDP_PIN_V1` (LRU hash; written and read by the `connect4/6` and `sendmsg4/6`
//! programs for UDP sockets; the
//! agent deletes the entries of backends that left their frontend). Key [`SockPinKey`]: the
//! socket (its cookie) and the service address and port a datagram was sent to; value
//! [`SockPinValue`]: the backend the socket's datagrams to that service go to. An unconnected
//! UDP socket (a resolver's) keeps one backend per service for as long as that backend exists,
//! as a conntrack flow does, instead of a new random backend per datagram (retries and
//! multi-datagram exchanges would otherwise spread over endpoints); a connected one that also
//! names the service in `sendto()` keeps the backend it connected to.
//!
//! IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`, a dual-stack socket reaching IPv4) are keyed
//! as the IPv4 address they map, with [`crate::addr::FAMILY_V4`]: the same frontends, backends
//! and entries as a plain IPv4 socket's.
//!
//! Byte order: addresses and ports network order, the cookie and the rest host order.

use crate::{Be16, addr::Addr, impl_pod};

/// Default number of `SOCK_REVNAT_V1` entries: one per (socket, backend) pair a process in the
/// cgroup reached through a service (a connected socket uses one; an unconnected UDP socket one
/// per backend its datagrams went to).
/// 262,144 entries take about 30 MiB of kernel memory (32-byte key, 20-byte value, LRU element
/// overhead); `svc-agent run --max-sock-revnat-entries` changes it.
pub const SOCK_REVNAT_ENTRIES: u32 = 262_144;

/// Default number of `SOCK_UDP_PIN_V1` entries: one per (UDP socket, service) pair
/// (about 10 MiB); `svc-agent run --max-sock-pin-entries` changes it.
pub const SOCK_UDP_PIN_ENTRIES: u32 = 65_536;

/// Key of `SOCK_REVNAT_V1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevNatKey {
    /// The socket's cookie (`bpf_get_socket_cookie`), host order.
    pub cookie: u64,
    /// The backend address the socket was sent to (see [`crate::addr`]), network order.
    pub addr: Addr,
    /// The backend port, network order.
    pub port: Be16,
    /// [`crate::addr::FAMILY_V4`] or [`crate::addr::FAMILY_V6`].
    pub family: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 5],
}
crate::assert_layout!(
    SockRevNatKey,
    size = 32,
    cookie = 0,
    addr = 8,
    port = 24,
    family = 26,
    _pad = 27
);

/// Value of `SOCK_REVNAT_V1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevNatValue {
    /// The service address the process named, network order (same family as the key).
    pub addr: Addr,
    /// The service port the process named, network order.
    pub port: Be16,
    /// Explicit padding, always zero.
    pub _pad: u16,
}
crate::assert_layout!(SockRevNatValue, size = 20, addr = 0, port = 16, _pad = 18);

/// Key of `SOCK_UDP_PIN_V1`: laid out as [`SockRevNatKey`], but the address and port are the
/// *service's* (what the process sent to), not a backend's.
pub type SockPinKey = SockRevNatKey;

/// Value of `SOCK_UDP_PIN_V1`: the backend a UDP socket's datagrams to one service
/// go to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockPinValue {
    /// The backend's id (`BACKENDS_V1` key); honoured only while that id still holds
    /// [`addr`](Self::addr) and [`port`](Self::port).
    pub backend_id: u32,
    /// The frontend's id (slot 0 of `SERVICES_V1`): the agent deletes the entry when the
    /// backend leaves this frontend.
    pub frontend_id: u32,
    /// The backend's address, network order.
    pub addr: Addr,
    /// The backend's port, network order.
    pub port: Be16,
    /// Explicit padding, always zero.
    pub _pad: u16,
}
crate::assert_layout!(
    SockPinValue,
    size = 28,
    backend_id = 0,
    frontend_id = 4,
    addr = 8,
    port = 24,
    _pad = 26
);

impl_pod!(SockRevNatKey, SockRevNatValue, SockPinValue);
