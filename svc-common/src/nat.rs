//! Source NAT for external flows to remote endpoints.
//!
//! A packet from outside the cluster to a `NodePort`, external or load-balancer address whose
//! chosen endpoint runs on another node (`externalTrafficPolicy: Cluster`) leaves this node
//! with its source rewritten to the node's SNAT address and a port of the SNAT range, so the
//! endpoint's reply comes back through this node, which reverses both translations. (An
//! endpoint on this node needs no SNAT: its replies pass this node's node-facing egress.)
//!
//! Map `SNAT_CONFIG_V1` (array of 2, index [`SNAT_V4`] / [`SNAT_V6`]; written by the agent at
//! start, read by the node-facing programs): [`SnatConfig`], the node's SNAT address of the
//! family and the port range. `enabled == 0`: the node has no SNAT address of the family
//! (new external flows to remote endpoints of that family are dropped, counted
//! `nat_no_address`).
//!
//! Map `SNAT_V1` (hash, no preallocation, not LRU; written by the node-facing programs, entries
//! of ended flows removed by the agent): key [`CtKey`](crate::conntrack::CtKey), the reply
//! tuple as it arrives (endpoint -> SNAT address and port, direction `REPLY`); value
//! [`SnatValue`], the client to put back as destination. The port is the key: a new flow's port
//! is taken by inserting its key only if absent, so two flows never share one; a taken key whose
//! value already names the flow's client and port is the flow's own (its conntrack entries were
//! evicted or expired before the agent removed the entry) and the flow keeps that port, so the
//! endpoint goes on seeing the same connection. A full table refuses the insert and the new
//! flow is dropped (`nat_table_full`): never evicted under a live flow, as an LRU map would.
//! The forward direction needs no lookup here: both conntrack entries of the flow carry the
//! port (`CtValue::snat_port`).
//!
//! Ports come from `[port_min, port_max]`, which the agent reserves on the node
//! (`net.ipv4.ip_local_reserved_ports`): the node's own `connect()`s never pick them, so a
//! reply to the node's own socket is never taken for an SNAT'd flow's.
//!
//! Addresses and ports in keys and `SnatValue` network order; `SnatConfig` ports host order.

use crate::{Be16, addr::Addr, impl_pod};

/// `SNAT_CONFIG_V1` index of the IPv4 configuration.
pub const SNAT_V4: u32 = 0;
/// `SNAT_CONFIG_V1` index of the IPv6 configuration.
pub const SNAT_V6: u32 = 1;
/// Entries of `SNAT_CONFIG_V1`.
pub const SNAT_CONFIG_ENTRIES: u32 = 2;

/// Default first port of the SNAT range: above Linux's default ephemeral range
/// (32768-60999), so the reservation takes nothing the node used before.
pub const DEFAULT_PORT_MIN: u16 = 61_000;
/// Default last port of the SNAT range.
pub const DEFAULT_PORT_MAX: u16 = 65_535;

/// How many ports a new flow tries (from a point chosen by a hash of its tuple) before it is
/// dropped as `nat_ports_exhausted`.
pub const PORT_TRIES: u32 = 16;

/// Value of `SNAT_CONFIG_V1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnatConfig {
    /// The node's SNAT address of the family (see [`crate::addr`]), network order.
    pub addr: Addr,
    /// First port of the range, host order.
    pub port_min: u16,
    /// Last port of the range (inclusive), host order.
    pub port_max: u16,
    /// 1: SNAT possible for this family; 0: no address.
    pub enabled: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 3],
}
crate::assert_layout!(
    SnatConfig,
    size = 24,
    addr = 0,
    port_min = 16,
    port_max = 18,
    enabled = 20
);

/// Value of `SNAT_V1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnatValue {
    /// The client's address, network order.
    pub client: Addr,
    /// The client's port, network order.
    pub client_port: Be16,
    /// Explicit padding, always zero.
    pub _pad: u16,
    /// When a reply last used the entry (`CLOCK_MONOTONIC` ns, coarse), for `inspect`.
    pub last_seen_ns: u64,
}
crate::assert_layout!(
    SnatValue,
    size = 32,
    client = 0,
    client_port = 16,
    last_seen_ns = 24
);

/// The `SNAT_CONFIG_V1` index for an address family ([`crate::addr::FAMILY_V4`] or
/// [`crate::addr::FAMILY_V6`]).
#[inline]
#[must_use]
pub const fn config_index(family: u8) -> u32 {
    if family == crate::addr::FAMILY_V6 {
        SNAT_V6
    } else {
        SNAT_V4
    }
}

/// The `n`th port a flow whose tuple hashes to `hash` tries in `[min, max]` (host order).
#[inline]
#[must_use]
pub const fn candidate_port(hash: u32, n: u32, min: u16, max: u16) -> u16 {
    let span = (max as u32).saturating_sub(min as u32) + 1;
    let offset = hash.wrapping_add(n.wrapping_mul(7919)) % span;
    #[expect(
        clippy::cast_possible_truncation,
        reason = "min + offset <= max, a u16"
    )]
    let port = (min as u32 + offset) as u16;
    port
}

impl_pod!(SnatConfig, SnatValue);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_stay_in_the_range_and_differ() {
        for (min, max) in [(61_000, 65_535), (40_000, 40_000), (1, 65_535)] {
            let mut seen = [false; 16];
            for n in 0..PORT_TRIES {
                let p = candidate_port(0xdead_beef, n, min, max);
                assert!((min..=max).contains(&p), "{p} outside {min}-{max}");
                if max - min >= 16 {
                    let i = n as usize;
                    seen[i] = !(0..n).any(|m| candidate_port(0xdead_beef, m, min, max) == p);
                }
            }
            if max - min >= 16 {
                assert!(seen.iter().all(|s| *s), "{min}-{max}: repeated candidates");
            }
        }
    }
}
