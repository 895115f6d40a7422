//! Which clients may reach a load balancer IP: `loadBalancerSourceRanges`.
//!
//! Map `SOURCE_RANGES_V1` (longest-prefix-match trie, `BPF_F_NO_PREALLOC` as the kernel requires
//! of LPM tries; written by the agent's reconciler, read by the node-facing program for new
//! external flows only). Key: the trie's prefix length (`u32`, host order, in bits of the data)
//! followed by [`SourceRangeKey`]: the frontend (address, port, protocol, family), then the
//! client address. Value: [`SourceRangeValue`] ([`verdict`]).
//!
//! For each external-scope frontend of a load balancer IP whose Service has ranges of the
//! frontend's own family (kube-proxy ignores the other family's; a frontend whose ranges are all
//! of the other family is unrestricted), the agent writes:
//! - one entry with the frontend's bits only ([`FRONTEND_BITS`], client all zero):
//!   [`verdict::DENY`];
//! - one entry per allowed prefix `client/N`: [`FRONTEND_BITS`] + N bits, [`verdict::ALLOW`]
//!   (a `/0` prefix lands on the frontend-only entry and makes it `ALLOW`: every client).
//!
//! The program looks the frontend and the client's full address up ([`LOOKUP_BITS`]): the
//! longest match answers `ALLOW` (the client is in a range), `DENY` (the frontend has ranges,
//! the client is in none: dropped, counted `source_range`), or nothing (no ranges: every client).
//! One lookup, no frontend id needed. Established flows are not looked up again: a change of the
//! ranges applies to new connections, as kube-proxy's rules apply to new conntrack entries.
//!
//! The agent writes a frontend's entries before the frontend itself is programmed and removes
//! them after it is gone, so a restricted load balancer IP is never open, not even briefly; a
//! frontend whose `DENY` entry cannot be written is not programmed.
//!
//! Addresses and port network order (as in the packet); prefix length and verdict host order.
//! An IPv4 address sits in the first four bytes of its 16 ([`crate::addr`]), so an IPv4 prefix
//! `/N` is N bits of the client part as well.

use crate::{Be16, addr::Addr, impl_pod};

/// Bits of the frontend part of [`SourceRangeKey`] (address, port, protocol, family): the
/// prefix length of a frontend's `DENY` entry. An allowed prefix `/N` has `FRONTEND_BITS + N`.
pub const FRONTEND_BITS: u32 = 160;

/// Bits of the whole [`SourceRangeKey`]: the prefix length of the program's lookups (the
/// client's full address).
pub const LOOKUP_BITS: u32 = 288;

/// Entries of `SOURCE_RANGES_V1`: one per allowed prefix plus one per restricted frontend (a
/// load balancer IP with two ports and three ranges takes eight). Not preallocated: memory
/// follows the entries written.
pub const SOURCE_RANGES_ENTRIES: u32 = 65_536;

/// What an entry of `SOURCE_RANGES_V1` says (values of [`SourceRangeValue::verdict`]).
pub mod verdict {
    /// The client is in one of the frontend's ranges: it may open new flows.
    pub const ALLOW: u32 = 1;
    /// The frontend has ranges and the client is in none: new flows are dropped.
    pub const DENY: u32 = 2;
}

/// Key data of `SOURCE_RANGES_V1` (the trie's prefix length comes before it in the map's key).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRangeKey {
    /// The frontend's address (see [`crate::addr`]), network order.
    pub frontend: Addr,
    /// The frontend's port, network order.
    pub port: Be16,
    /// IP protocol number (TCP 6, UDP 17).
    pub proto: u8,
    /// [`crate::addr::FAMILY_V4`] or [`crate::addr::FAMILY_V6`].
    pub family: u8,
    /// The client address (an allowed prefix with its host bits zero, in the agent's entries;
    /// the packet's source, in the program's lookups), network order.
    pub client: Addr,
}
crate::assert_layout!(
    SourceRangeKey,
    size = 36,
    frontend = 0,
    port = 16,
    proto = 18,
    family = 19,
    client = 20,
);

/// Value of `SOURCE_RANGES_V1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceRangeValue {
    /// [`verdict::ALLOW`] or [`verdict::DENY`].
    pub verdict: u32,
}
crate::assert_layout!(SourceRangeValue, size = 4, verdict = 0);

impl_pod!(SourceRangeKey, SourceRangeValue);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bit_counts_follow_the_layout() {
        assert_eq!(
            FRONTEND_BITS as usize,
            8 * core::mem::offset_of!(SourceRangeKey, client)
        );
        assert_eq!(
            LOOKUP_BITS as usize,
            8 * core::mem::size_of::<SourceRangeKey>()
        );
    }
}
