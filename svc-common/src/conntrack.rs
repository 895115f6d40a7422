//! Connection tracking for translated flows.
//!
//! Map `CT_V1` (LRU hash; written and read by the kernel programs; the agent only deletes the
//! entries of UDP flows to backends that left their frontend). Every translated connection has
//! two entries, inserted as a pair:
//! - forward, key `{client -> VIP}` ([`dir::FORWARD`]): value holds the chosen backend;
//! - reply, key `{backend -> client}` ([`dir::REPLY`]): value holds the VIP and port to put
//!   back as the source of replies.
//!
//! Entries expire when idle longer than their timeout (checked on lookup; LRU evicts under
//! pressure). Addresses and ports network order; the rest host order.

use crate::{Be16, addr::Addr, impl_pod};

/// Direction of a conntrack key.
pub mod dir {
    /// Client to service: the key carries the VIP as destination.
    pub const FORWARD: u8 = 0;
    /// Backend to client: the key carries the backend as source.
    pub const REPLY: u8 = 1;
}

/// State bits of an entry.
pub mod state {
    /// A FIN or RST was seen in this entry's direction: the short timeout applies.
    pub const CLOSING: u8 = 1 << 0;
    /// The reply leg of a hairpinned flow (a pod reaching itself through a service), keyed as
    /// the pod sends it (`pod:backend-port -> VIP:client-port`, direction forward); the value
    /// holds the VIP and service port to put back as its source.
    pub const HAIRPIN_REPLY: u8 = 1 << 1;
}

/// Idle timeouts, in nanoseconds of `CLOCK_MONOTONIC` (`bpf_ktime_get_coarse_ns`).
pub mod timeout {
    /// An established TCP connection (6 hours).
    pub const TCP_ESTABLISHED_NS: u64 = 6 * 3600 * 1_000_000_000;
    /// A TCP connection after FIN or RST (10 seconds).
    pub const TCP_CLOSING_NS: u64 = 10 * 1_000_000_000;
    /// A UDP or other flow (60 seconds).
    pub const OTHER_NS: u64 = 60 * 1_000_000_000;
}

/// Key of `CT_V1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey {
    /// Source address, network order.
    pub src: Addr,
    /// Destination address, network order.
    pub dst: Addr,
    /// Source port, network order.
    pub sport: Be16,
    /// Destination port, network order.
    pub dport: Be16,
    /// IP protocol number.
    pub proto: u8,
    /// Address family.
    pub family: u8,
    /// [`dir::FORWARD`] or [`dir::REPLY`].
    pub dir: u8,
    /// Explicit padding, always zero.
    pub _pad: u8,
}
crate::assert_layout!(
    CtKey,
    size = 40,
    src = 0,
    dst = 16,
    sport = 32,
    dport = 34,
    proto = 36,
    family = 37,
    dir = 38
);

/// Value of `CT_V1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    /// Forward: the backend address. Reply: the VIP to restore as source.
    pub addr: Addr,
    /// Forward: the backend port. Reply: the service port to restore as source port.
    pub port: Be16,
    /// [`state`] bits.
    pub state: u8,
    /// Explicit padding, always zero.
    pub _pad: u8,
    /// The backend id (forward: to check the backend still exists; both: counters).
    pub backend_id: u32,
    /// The frontend (service port) id, for its counters.
    pub frontend_id: u32,
    /// Explicit padding, always zero.
    pub _pad2: u32,
    /// When the entry was last used: `CLOCK_MONOTONIC` ns at the last tick
    /// (`bpf_ktime_get_coarse_ns`; timeouts are seconds).
    pub last_seen_ns: u64,
}
crate::assert_layout!(
    CtValue,
    size = 40,
    addr = 0,
    port = 16,
    state = 18,
    backend_id = 20,
    frontend_id = 24,
    last_seen_ns = 32
);

impl_pod!(CtKey, CtValue);
