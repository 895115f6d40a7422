//! Connect-time translation state (cgroup `sock_addr` programs): reverse-translation entries per
//! socket.
//!
//! Map `SOCK_REVNAT_V1` (LRU hash; written by the `connect4/6` and `sendmsg4/6` programs when
//! they send a socket to a backend, read by `getpeername4/6` and `recvmsg4/6`, never written by
//! the agent, which reads it to find the connected UDP sockets of ended backends and destroy
//! them). Key [`SockRevNatKey`]: the socket (its cookie) and the backend it was sent to;
//! value [`SockRevNatValue`]: the service address and port the process asked for, which
//! `getpeername()` and `recvfrom()` report instead of the backend's. Entries are not removed
//! when a socket closes: socket cookies are never reused while the machine runs, so a stale
//! entry matches nothing and the LRU evicts it.
//! Byte order: addresses and ports network order, the cookie and the rest host order.

use crate::{Be16, addr::Addr, impl_pod};

/// Default number of `SOCK_REVNAT_V1` entries: one per (socket, backend) pair a process in the
/// cgroup reached through a service (a connected socket uses one; an unconnected UDP socket one
/// per backend its datagrams went to).
pub const SOCK_REVNAT_ENTRIES: u32 = 65_536;

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

impl_pod!(SockRevNatKey, SockRevNatValue);
