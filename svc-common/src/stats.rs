//! Packet and drop counters.
//!
//! Maps `SVC_STATS_V1` and `BACKEND_STATS_V1` (per-CPU hashes without preallocation): the
//! kernel programs create an entry with the first packet of a new flow to a frontend and
//! backend and add to it with every translated packet; the agent deletes an entry with its id
//! (and, in its full passes, any entry of an id it does not hold); `inspect services` sums them
//! over CPUs (no entry: nothing counted yet). Key `u32` frontend id / backend id, value
//! [`Counter`]. Translated packets count in both directions. Per CPU so the hot path needs no
//! atomics (the BPF target has none in Rust); no preallocation and no entry before the first
//! flow so memory follows the ids in use, not capacity times CPUs. (The agent created every
//! entry before: an entry of a per-CPU hash costs the kernel's per-CPU allocator about 16 us,
//! 2 s of a 30,000-Service cold sync.) Packets of established flows reach them through
//! `PENDING_STATS_V1`, a per-CPU write-back cache ([`Pending`]): readers add what it holds.
//!
//! Map `PKT_STATS_V1` (per-CPU array, written by every kernel program, read by the agent's
//! `inspect` and metrics): key `u32` = a [`PktCounter`] index, value [`Counter`] (host byte
//! order). Each packet a program sees adds to exactly one L3 counter and, when it is IP with a
//! readable transport header, exactly one L4 counter; a translated packet also adds to `dnat` or
//! `rev_nat`, a dropped one to `dropped` (and its reason in `DROP_STATS_V1`).

use crate::impl_pod;

/// Packets and bytes, host byte order. Summed over CPUs by the reader.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    /// Number of packets.
    pub packets: u64,
    /// Number of bytes (the whole frame, `skb->len`).
    pub bytes: u64,
}
crate::assert_layout!(Counter, size = 16, packets = 0, bytes = 8);
impl_pod!(Counter);

/// Entries of `PENDING_STATS_V1` per CPU.
pub const PENDING_SLOTS: u32 = 64;

/// Value of `PENDING_STATS_V1` (per-CPU array of [`PENDING_SLOTS`] entries, written by the
/// kernel programs, read by `inspect`; host order): a write-back cache in front of
/// `SVC_STATS_V1` and `BACKEND_STATS_V1` for the packets of established flows. A packet whose
/// (frontend, backend) pair holds its slot ([`pending_slot`]) adds to it (one array lookup);
/// one of another pair first adds the slot's packets to the two per-id hashes (the two hash
/// lookups every packet paid before) and takes the slot. What a slot holds is counted nowhere
/// else, so readers add it to the pair's ids (the ids they hold); a pair whose ids are gone
/// is dropped at its flush, as established packets never create counters. `packets` 0: free.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pending {
    /// The frontend id the counts belong to.
    pub frontend_id: u32,
    /// The backend id the counts belong to.
    pub backend_id: u32,
    /// Packets not yet added to the per-id hashes.
    pub packets: u64,
    /// Their bytes.
    pub bytes: u64,
}
crate::assert_layout!(
    Pending,
    size = 24,
    frontend_id = 0,
    backend_id = 4,
    packets = 8,
    bytes = 16
);
impl_pod!(Pending);

/// The `PENDING_STATS_V1` slot of the pair (`frontend_id`, `backend_id`): a multiplicative hash
/// of both, so the backends of one frontend spread over the slots.
#[inline]
#[must_use]
pub const fn pending_slot(frontend_id: u32, backend_id: u32) -> u32 {
    (frontend_id ^ backend_id.rotate_left(16)).wrapping_mul(0x9e37_79b1) >> 26
}
const _: () = assert!(1 << (32 - 26) == PENDING_SLOTS);

/// Index into `PKT_STATS_V1`: what the parser saw.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PktCounter {
    /// Not IPv4 or IPv6 (ARP, VLAN-tagged frames, ...): passed untouched.
    NonIp = 0,
    /// An IPv4 packet with a valid header.
    Ipv4 = 1,
    /// An IPv6 packet with a valid header.
    Ipv6 = 2,
    /// The IP header is truncated or inconsistent (version, IHL, total length): passed to the
    /// kernel, whose own validation decides.
    MalformedIp = 3,
    /// TCP with a complete header.
    Tcp = 4,
    /// UDP with a complete header.
    Udp = 5,
    /// ICMP (v4) with a complete header.
    Icmp = 6,
    /// `ICMPv6` with a complete header.
    Icmpv6 = 7,
    /// Any other transport protocol (SCTP, GRE, ...).
    OtherL4 = 8,
    /// An IP fragment (IPv4 MF/offset or IPv6 fragment header).
    Fragment = 9,
    /// The transport header is truncated or inconsistent (e.g. TCP data offset < 5).
    MalformedL4 = 10,
    /// The IPv6 extension header chain is longer than the parser follows.
    Ipv6ExtTooLong = 11,
    /// Destination NAT to a service backend (forward direction).
    Dnat = 12,
    /// Source restored to the service address on a reply (reverse direction).
    RevNat = 13,
    /// A packet to a service address and port was dropped (see `DROP_STATS_V1`).
    Dropped = 14,
    /// A packet to a service without endpoints was answered with a TCP reset or an ICMP port
    /// unreachable.
    Rejected = 15,
    /// A `connect()` or `sendto()` to a service address was sent to a backend at the socket
    /// (connect-time translation; no packet of that flow needs translating).
    SockXlate = 16,
    /// `getpeername()` or `recvfrom()` reported the service address instead of the backend the
    /// socket was sent to.
    SockRevNat = 17,
    /// A TCP packet from a pod that is not a SYN found no connection-table entry (evicted
    /// under pressure, expired, or its backend left): sent to the backend a hash of its tuple
    /// chooses, which with an unchanged set of backends is where it was. The sign of evictions.
    CtMissMidflow = 18,
    /// A later IP fragment (non-zero offset) to a frontend or from a backend address whose
    /// first fragment was not translated here (not seen yet: out of order, or not for a
    /// service): passed untranslated (see `FRAG_V1`).
    FragUntracked = 19,
    /// A TCP/UDP packet, `connect()` or `sendto()` to a `ClusterIP` on a port and protocol the
    /// Service does not have: rejected (also counted under `rejected`).
    UnlistedPort = 20,
    /// A packet from outside to a `NodePort`, external or load-balancer address whose
    /// destination was rewritten (also counted under `dnat`'s siblings per frontend).
    ExtDnat = 21,
    /// A packet of an external flow to a remote endpoint whose source became the node's
    /// address and a port of the SNAT range.
    Snat = 22,
    /// A reply to an SNAT'd flow whose destination became the client again.
    RevSnat = 23,
    /// A frame the XDP program decided itself: sent back out (`XDP_TX`, `XDP_REDIRECT`),
    /// dropped, or passed to TC with its decision (`svc_common::handoff`). Frames it passed
    /// untouched are TC's and not counted here.
    Xdp = 24,
}

impl PktCounter {
    /// Every counter, in index order.
    pub const ALL: [Self; 25] = [
        Self::NonIp,
        Self::Ipv4,
        Self::Ipv6,
        Self::MalformedIp,
        Self::Tcp,
        Self::Udp,
        Self::Icmp,
        Self::Icmpv6,
        Self::OtherL4,
        Self::Fragment,
        Self::MalformedL4,
        Self::Ipv6ExtTooLong,
        Self::Dnat,
        Self::RevNat,
        Self::Dropped,
        Self::Rejected,
        Self::SockXlate,
        Self::SockRevNat,
        Self::CtMissMidflow,
        Self::FragUntracked,
        Self::UnlistedPort,
        Self::ExtDnat,
        Self::Snat,
        Self::RevSnat,
        Self::Xdp,
    ];
    /// Number of entries in `PKT_STATS_V1`.
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// The counter's name as `inspect` and metrics show it.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::NonIp => "non_ip",
            Self::Ipv4 => "ipv4",
            Self::Ipv6 => "ipv6",
            Self::MalformedIp => "malformed_ip",
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Icmp => "icmp",
            Self::Icmpv6 => "icmpv6",
            Self::OtherL4 => "other_l4",
            Self::Fragment => "fragment",
            Self::MalformedL4 => "malformed_l4",
            Self::Ipv6ExtTooLong => "ipv6_ext_too_long",
            Self::Dnat => "dnat",
            Self::RevNat => "rev_nat",
            Self::Dropped => "dropped",
            Self::Rejected => "rejected",
            Self::SockXlate => "sock_xlate",
            Self::SockRevNat => "sock_rev_nat",
            Self::CtMissMidflow => "ct_miss_midflow",
            Self::FragUntracked => "frag_untracked",
            Self::UnlistedPort => "unlisted_port",
            Self::ExtDnat => "ext_dnat",
            Self::Snat => "snat",
            Self::RevSnat => "rev_snat",
            Self::Xdp => "xdp",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_indices_are_dense_and_names_unique() {
        for (i, c) in PktCounter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
            for other in &PktCounter::ALL[i + 1..] {
                assert_ne!(c.name(), other.name());
            }
        }
    }
}

/// Why a program dropped a packet: index into `DROP_STATS_V1` (per-CPU array, written by the
/// kernel programs, read by `inspect` and metrics; value [`Counter`], host order).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// A service port with no endpoint at all, and the rejection reply could not be built
    /// (IPv4 options on a non-TCP request, a TCP reset answering a reset).
    NoEndpoints = 0,
    /// internalTrafficPolicy (or, from outside, externalTrafficPolicy) Local and no endpoint
    /// on this node.
    NoLocalEndpoint = 1,
    /// A backend slot points at a backend id the backends map does not hold.
    BackendMissing = 2,
    /// The connection table refused the pair of entries (forward and reply), or the pod's
    /// record in `TC_CLIENTS_V1` (written before them) could not be written.
    CtInsertFailed = 3,
    /// Rewriting the packet (store or checksum helper) failed.
    RewriteFailed = 4,
    /// A packet to a `ClusterIP` on a port the Service does not have, and the rejection reply
    /// could not be built (see `NoEndpoints`).
    UnlistedPort = 5,
    /// A new flow's reply tuple (backend -> client and port) belongs to a live connection of
    /// another flow: the client used the same source port towards another frontend with the
    /// same backend, so replies of the two could not be told apart. The new flow's first
    /// packet is dropped (the client retries; the tuple frees when the other connection closes).
    CtReplyClash = 6,
    /// A new flow from a client outside the `loadBalancerSourceRanges` of the load balancer IP
    /// it reached from outside (`SOURCE_RANGES_V1` said `DENY`): dropped.
    SourceRange = 7,
    /// An external flow to a remote endpoint needs SNAT, and the node has no SNAT address of
    /// the packet's family.
    NatNoAddress = 8,
    /// Every SNAT port tried for the flow's (node address, endpoint) pair was taken.
    NatPortsExhausted = 9,
    /// The SNAT table (`SNAT_V1`) refused the flow's entry (full): the flow is dropped, never
    /// translated without a way back.
    NatTableFull = 10,
    /// An SNAT'd packet (or the reply of an SNAT'd flow) the node has no route for: the
    /// programs send these on themselves (the kernel would refuse a packet arriving with one of
    /// the node's own addresses as its source).
    NoRoute = 11,
    /// The XDP program translated a packet it could not send on itself (the next hop's
    /// neighbour entry is not resolved yet) and the driver keeps no metadata to hand it to the
    /// TC program with its decision (see `handoff`).
    XdpHandoff = 12,
}

impl DropReason {
    /// Every reason, in index order.
    pub const ALL: [Self; 13] = [
        Self::NoEndpoints,
        Self::NoLocalEndpoint,
        Self::BackendMissing,
        Self::CtInsertFailed,
        Self::RewriteFailed,
        Self::UnlistedPort,
        Self::CtReplyClash,
        Self::SourceRange,
        Self::NatNoAddress,
        Self::NatPortsExhausted,
        Self::NatTableFull,
        Self::NoRoute,
        Self::XdpHandoff,
    ];
    /// Number of entries in `DROP_STATS_V1`.
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// The reason's name as `inspect` and metrics show it.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::NoEndpoints => "no_endpoints",
            Self::NoLocalEndpoint => "no_local_endpoint",
            Self::BackendMissing => "backend_missing",
            Self::CtInsertFailed => "ct_insert_failed",
            Self::RewriteFailed => "rewrite_failed",
            Self::UnlistedPort => "unlisted_port_dropped",
            Self::CtReplyClash => "ct_reply_clash",
            Self::SourceRange => "source_range",
            Self::NatNoAddress => "nat_no_address",
            Self::NatPortsExhausted => "nat_ports_exhausted",
            Self::NatTableFull => "nat_table_full",
            Self::NoRoute => "no_route",
            Self::XdpHandoff => "xdp_handoff",
        }
    }
}

#[cfg(test)]
mod drop_tests {
    use super::*;

    #[test]
    fn drop_reasons_are_dense_and_named_uniquely() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
            assert!(
                DropReason::ALL[i + 1..]
                    .iter()
                    .all(|o| o.name() != r.name())
            );
        }
    }
}
