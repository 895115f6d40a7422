//! IP fragments of translated datagrams.
//!
//! Only the first fragment of a datagram (offset 0) carries the transport header, so only it
//! can be matched to a service or a connection. Map `FRAG_V1` (LRU hash; written and read by
//! the pod programs, never by the agent): when a first fragment is translated, its key
//! [`FragKey`] (the datagram's addresses *as they arrived*, IP identification, protocol,
//! family) is stored with [`FragValue`], the addresses the translation gave it; a later
//! fragment (non-zero offset) of the same datagram looks that key up and gets the same
//! addresses (and the IPv4 header checksum), nothing else: it has no transport header, and the
//! transport checksum in the first fragment covers the whole datagram.
//!
//! A later fragment that arrives before its first (out of order), or whose first fragment was
//! not translated, finds no entry and is passed untranslated, counted `frag_untracked`. An
//! entry older than [`FRAG_TIMEOUT_NS`] is ignored (the kernel's reassembly gives up after 30 s
//! for IPv4, 60 s for IPv6; an IP identification is reused long after).
//! Addresses network order, the identification as it sits in the packet (IPv4: 16 bits
//! zero-extended, IPv6: 32 bits), everything else host order.

use crate::{addr::Addr, impl_pod};

/// `FRAG_V1` entries: datagrams in flight at once (fragments live for milliseconds; LRU).
pub const FRAG_ENTRIES: u32 = 8192;

/// An entry is followed for this long after its first fragment (60 s, IPv6's reassembly
/// timeout).
pub const FRAG_TIMEOUT_NS: u64 = 60_000_000_000;

/// Flags of a [`FragValue`].
pub mod frag_flags {
    /// The first fragment was a hairpin (a pod reaching itself through a service): later
    /// fragments are sent back out of the interface they came in on, as it was.
    pub const HAIRPIN: u32 = 1 << 0;
}

/// Key of `FRAG_V1`: one datagram, by the addresses it arrived with.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragKey {
    /// Source address as it arrived, network order.
    pub src: Addr,
    /// Destination address as it arrived, network order.
    pub dst: Addr,
    /// IP identification (IPv4: the 16-bit field, zero-extended; IPv6: the fragment header's
    /// 32 bits), raw as in the packet.
    pub id: u32,
    /// Transport protocol of the datagram.
    pub proto: u8,
    /// [`crate::addr::FAMILY_V4`] or [`crate::addr::FAMILY_V6`].
    pub family: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 2],
}
crate::assert_layout!(
    FragKey,
    size = 40,
    src = 0,
    dst = 16,
    id = 32,
    proto = 36,
    family = 37
);

/// Value of `FRAG_V1`: what later fragments of the datagram get.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragValue {
    /// Source address the first fragment left with, network order.
    pub src: Addr,
    /// Destination address the first fragment left with, network order.
    pub dst: Addr,
    /// When the first fragment was translated (`CLOCK_MONOTONIC` ns, coarse).
    pub created: u64,
    /// [`frag_flags`].
    pub flags: u32,
    /// Explicit padding, always zero.
    pub _pad: u32,
}
crate::assert_layout!(
    FragValue,
    size = 48,
    src = 0,
    dst = 16,
    created = 32,
    flags = 40
);

impl_pod!(FragKey, FragValue);
