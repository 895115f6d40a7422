//! `ClientIP` session affinity.
//!
//! Map `AFFINITY_V1` (LRU hash; written and read by the kernel programs; the agent only deletes
//! the entries of backends that left their frontend): key [`AffinityKey`]
//! (client address, frontend id), value [`AffinityValue`] (the backend the client was sent
//! to, and when). An entry is honoured while younger than the frontend's affinity timeout
//! (refreshed on use) and while its backend may still take new connections from this
//! frontend (exists; not terminating unless the frontend serves from terminating endpoints;
//! local when the frontend is local-only). Addresses network order, the rest host order.

use crate::{addr::Addr, impl_pod};

/// [`AffinityKey::family`] of a client known by its network namespace rather than its address:
/// the connect-time programs see sockets, not packets, and key a socket's client by its
/// namespace's cookie (`bpf_get_netns_cookie`, host order in the first 8 bytes of
/// [`AffinityKey::client`], the rest zero). A pod is one namespace, as it is one address; every
/// host-network process shares the node's namespace, as it shares the node's address.
pub const CLIENT_NETNS: u8 = 0xff;

/// Key of `AFFINITY_V1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// The client's address, or its network namespace's cookie when [`family`](Self::family)
    /// is [`CLIENT_NETNS`].
    pub client: Addr,
    /// The frontend's id (`ServiceValue::id` of slot 0).
    pub frontend_id: u32,
    /// Address family of the client, or [`CLIENT_NETNS`].
    pub family: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 3],
}
crate::assert_layout!(
    AffinityKey,
    size = 24,
    client = 0,
    frontend_id = 16,
    family = 20
);

/// Value of `AFFINITY_V1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    /// The backend the client sticks to.
    pub backend_id: u32,
    /// Explicit padding, always zero.
    pub _pad: u32,
    /// Last use, `CLOCK_MONOTONIC` ns (`bpf_ktime_get_ns`; the TC path reads the coarse
    /// `bpf_ktime_get_coarse_ns`, the same clock at the last tick).
    pub last_used_ns: u64,
}
crate::assert_layout!(AffinityValue, size = 16, backend_id = 0, last_used_ns = 8);

impl_pod!(AffinityKey, AffinityValue);
