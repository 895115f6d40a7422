//! Which addresses are service frontends or backends at all: the packet path's first test.
//!
//! Map `ADDRS_V1` (hash, no preallocation; written by the agent's reconciler, read by the pod
//! programs): key [`AddrKey`] (address, family), value [`AddrValue`] ([`addr_flags`]). An
//! address has [`addr_flags::FRONTEND`] while some `SERVICES_V1` frontend (slot 0) has it, and
//! [`addr_flags::BACKEND`] while some `BACKENDS_V1` entry has it (and for a grace period after
//! the last one left, so replies on their way are still translated); it has no entry when it
//! is neither. The agent derives it from those two maps' contents: it writes an address before
//! the entries that need it and removes it after the last one is gone, and rebuilds it from
//! them when it adopts pinned maps.
//!
//! A packet from a pod whose destination is not a frontend address, and a packet to a pod whose
//! source is not a backend address, cannot belong to a translated flow: one lookup in this
//! small map (instead of misses in `CT_V1` and `SERVICES_V1`) and the packet is passed.
//! Addresses network order, flags host order.

use crate::{addr::Addr, impl_pod};

/// Flags of an address (bits of [`AddrValue::flags`]).
pub mod addr_flags {
    /// The address of at least one service frontend (any port, protocol and scope).
    pub const FRONTEND: u32 = 1 << 0;
    /// The address of at least one backend.
    pub const BACKEND: u32 = 1 << 1;
    /// A `ClusterIP`: the address of at least one internal-scope frontend. A TCP or UDP packet
    /// (or a `connect()` / `sendto()`) to such an address on a port and protocol no frontend
    /// has is rejected at once (TCP reset / ICMP port unreachable / `ECONNREFUSED`), as
    /// kube-proxy rejects it per `ClusterIP`. Node addresses, external and load-balancer IPs
    /// (other scopes, later) never get it: their other ports belong to someone else.
    pub const CLUSTER_IP: u32 = 1 << 2;
    /// The address of at least one external-scope frontend (a node address with `NodePort`s,
    /// an external or load-balancer IP): the node-facing programs' first test.
    pub const EXTERNAL: u32 = 1 << 3;
}

/// Key of `ADDRS_V1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddrKey {
    /// The address (see [`crate::addr`]), network order.
    pub addr: Addr,
    /// [`crate::addr::FAMILY_V4`] or [`crate::addr::FAMILY_V6`].
    pub family: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 3],
}
crate::assert_layout!(AddrKey, size = 20, addr = 0, family = 16);

impl AddrKey {
    /// The key of `addr` (network order) in `family`, padding zeroed.
    #[expect(
        clippy::inline_always,
        reason = "the kernel programs build keys on their deepest call chains: it must not become a BPF-to-BPF call"
    )]
    #[inline(always)]
    #[must_use]
    pub const fn new(addr: Addr, family: u8) -> Self {
        // The padding as a literal: `[0; 3]` would be a `memset` call in the kernel programs.
        Self {
            addr,
            family,
            _pad: [0, 0, 0],
        }
    }
}

/// Value of `ADDRS_V1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AddrValue {
    /// [`addr_flags`] bits, never 0.
    pub flags: u32,
}
crate::assert_layout!(AddrValue, size = 4, flags = 0);

impl_pod!(AddrKey, AddrValue);
