//! The XDP program's hand-off to the TC program of the same node-facing interface.
//!
//! `svc_xdp_from_world` decides what it can finish itself (a translated flow sent back out
//! with `XDP_TX` or `XDP_REDIRECT`, a drop) and hands the rest to the stack with `XDP_PASS`.
//! A packet it translated for this node (an endpoint here), or translated but could not send
//! on (the next hop's neighbour entry is not resolved: only TC's `bpf_redirect_neigh` can),
//! carries its decision in the packet's metadata (`bpf_xdp_adjust_meta`, the 4 bytes right
//! before the frame, which the kernel keeps on the socket buffer as `data_meta`), so
//! `svc_tc_from_world` acts on the decision instead of deciding again. A packet passed without
//! metadata is untouched, and TC serves it exactly as it does with XDP off.
//!
//! The word is written and read in native byte order; its top 24 bits are [`MAGIC`], so
//! metadata some other XDP program left is never taken for ours.

/// Length of the metadata word, in bytes (metadata lengths are multiples of 4).
pub const META_LEN: usize = 4;

/// The top 24 bits of every metadata word of ours (`"svc"` in ASCII).
pub const MAGIC: u32 = 0x7376_6300;

/// Translated by XDP for an endpoint of this node: TC lets it through untouched (and counts
/// nothing: XDP counted it).
pub const DELIVERED: u32 = MAGIC | 1;

/// Translated by XDP (SNAT'd, or the reply of an SNAT'd flow), an IPv4 packet, to be sent on by
/// TC (`bpf_redirect_neigh`: the next hop's neighbour entry is not resolved yet). Its TTL is
/// still the one it arrived with.
pub const FORWARD_V4: u32 = MAGIC | 2;

/// As [`FORWARD_V4`], an IPv6 packet.
pub const FORWARD_V6: u32 = MAGIC | 3;
