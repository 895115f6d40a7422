//! Connection tracking for translated flows.
//!
//! Two LRU hash maps with the same key and value, written and read by the kernel programs (the
//! agent only deletes the entries of UDP flows to backends that left their frontend):
//! - `CT_NEW_V1` holds flows nothing has answered yet: the first packet of a flow (a SYN, a
//!   UDP datagram, or a mid-flow packet whose entry was lost) inserts its pair here;
//! - `CT_V1` holds flows the backend answered: the first reply (a SYN-ACK, a UDP answer; not a
//!   reset) moves the pair from `CT_NEW_V1` into `CT_V1` ("promotion"), rebuilt from the reply
//!   entry alone ([`forward_of`]).
//!
//! Unanswered SYNs (scans, spoofed floods, connects to a backend that is down) and unanswered
//! UDP therefore only ever evict each other, never an established flow. Lookups try `CT_V1`
//! first and fall back to `CT_NEW_V1`.
//!
//! Every translated connection has two entries, inserted as a pair:
//! - forward, key `{client -> VIP}` ([`dir::FORWARD`]): value holds the chosen backend;
//! - reply, key `{backend -> client}` ([`dir::REPLY`]): value holds the VIP and port to put
//!   back as the source of replies. (A hairpinned flow's reply leg is keyed as the pod sends
//!   it, direction forward, with [`state::HAIRPIN_REPLY`].)
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

/// State bits of an entry. Both entries of a pair carry the same FIN and closing bits (a FIN
/// or reset updates both).
pub mod state {
    /// The connection is closing: both directions sent a FIN, or either sent a reset. The
    /// short timeout applies, and a SYN on the tuple opens a new connection.
    pub const CLOSING: u8 = 1 << 0;
    /// The reply leg of a hairpinned flow (a pod reaching itself through a service), keyed as
    /// the pod sends it (`pod:backend-port -> VIP:client-port`, direction forward); the value
    /// holds the VIP and service port to put back as its source.
    pub const HAIRPIN_REPLY: u8 = 1 << 1;
    /// The client sent a FIN (its side of the connection is shut down). Alone, it changes no
    /// timeout: the backend may go on sending (half-close).
    pub const FIN_FORWARD: u8 = 1 << 2;
    /// The backend sent a FIN. Alone, it changes no timeout (half-close).
    pub const FIN_REPLY: u8 = 1 << 3;
    /// Any sign the connection is ending: a SYN on such an entry opens a new connection.
    pub const ENDING: u8 = CLOSING | FIN_FORWARD | FIN_REPLY;
}

/// Idle timeouts, in nanoseconds of `CLOCK_MONOTONIC` (`bpf_ktime_get_coarse_ns`).
pub mod timeout {
    /// An established TCP connection (6 hours).
    pub const TCP_ESTABLISHED_NS: u64 = 6 * 3600 * 1_000_000_000;
    /// A TCP connection after a FIN in each direction, or a reset (10 seconds).
    pub const TCP_CLOSING_NS: u64 = 10 * 1_000_000_000;
    /// A flow in `CT_NEW_V1` (nothing answered it yet: a SYN, a UDP datagram), TCP or UDP (60
    /// seconds, Cilium's SYN timeout; kernel conntrack waits 120 s in `SYN_SENT`). A client
    /// retransmitting its SYN refreshes it.
    pub const UNREPLIED_NS: u64 = 60 * 1_000_000_000;
    /// A UDP or other flow (60 seconds).
    pub const OTHER_NS: u64 = 60 * 1_000_000_000;
}

/// How long an entry may stay idle: `unanswered` for `CT_NEW_V1`, `proto` the flow's IP
/// protocol, `st` its [`state`] bits.
#[inline]
#[must_use]
pub const fn idle_timeout_ns(unanswered: bool, proto: u8, st: u8) -> u64 {
    if proto == crate::net::ipproto::TCP && st & state::CLOSING != 0 {
        timeout::TCP_CLOSING_NS
    } else if unanswered {
        timeout::UNREPLIED_NS
    } else if proto != crate::net::ipproto::TCP {
        timeout::OTHER_NS
    } else {
        timeout::TCP_ESTABLISHED_NS
    }
}

/// Key of `CT_V1` and `CT_NEW_V1`.
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

/// Value of `CT_V1` and `CT_NEW_V1`.
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
    /// Both entries of an external flow to a remote endpoint: the source port it was given on
    /// the node's SNAT address (`svc_common::nat`), network order; 0: not SNAT'd.
    pub snat_port: Be16,
    /// Explicit padding, always zero.
    pub _pad2: u16,
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
    snat_port = 28,
    last_seen_ns = 32
);

impl_pod!(CtKey, CtValue);

/// Whether the entry `key`/`value` is the reply leg of its flow: keyed by what the backend
/// sends (a reply entry, or a hairpinned flow's reply leg).
#[must_use]
pub const fn is_reply_leg(key: &CtKey, value: &CtValue) -> bool {
    key.dir == dir::REPLY || value.state & state::HAIRPIN_REPLY != 0
}

/// Whether two addresses are equal (a loop the BPF verifier accepts; `==` on arrays may
/// become a `memcmp` call).
#[inline]
#[must_use]
pub fn addr_eq(a: &Addr, b: &Addr) -> bool {
    let mut i = 0;
    while i < 16 {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// The key of the reply leg of the flow whose forward key is `fwd`, sent to `backend`:`port`.
/// Hairpin (the client is its own backend): the reply leaves the pod towards the VIP, the
/// source the forward leg was given, so it is keyed as the pod sends it (direction forward);
/// otherwise it comes from the backend to the client.
#[inline]
#[must_use]
pub fn reply_key(fwd: &CtKey, backend: &Addr, port: Be16) -> CtKey {
    let hairpin = addr_eq(backend, &fwd.src);
    CtKey {
        src: *backend,
        dst: if hairpin { fwd.dst } else { fwd.src },
        sport: port,
        dport: fwd.sport,
        proto: fwd.proto,
        family: fwd.family,
        dir: if hairpin { dir::FORWARD } else { dir::REPLY },
        _pad: 0,
    }
}

/// The forward key and value of the flow whose reply leg is `reply` / `value` (the value of a
/// reply leg holds the VIP and service port; its key names the backend and the client's port).
#[inline]
#[must_use]
pub fn forward_of(reply: &CtKey, value: &CtValue) -> (CtKey, CtValue) {
    let hairpin = value.state & state::HAIRPIN_REPLY != 0;
    let key = CtKey {
        // Hairpin: the reply leg goes from the pod to the VIP; the pod is the client.
        src: if hairpin { reply.src } else { reply.dst },
        dst: value.addr,
        sport: reply.dport,
        dport: value.port,
        proto: reply.proto,
        family: reply.family,
        dir: dir::FORWARD,
        _pad: 0,
    };
    let fwd = CtValue {
        addr: reply.src,
        port: reply.sport,
        state: value.state & !state::HAIRPIN_REPLY,
        ..*value
    };
    (key, fwd)
}

/// The key of the other entry of the pair `key`/`value` belongs to.
#[inline]
#[must_use]
pub fn peer_key(key: &CtKey, value: &CtValue) -> CtKey {
    if is_reply_leg(key, value) {
        forward_of(key, value).0
    } else {
        reply_key(key, &value.addr, value.port)
    }
}

/// A hash of a forward key's tuple (addresses, ports, protocol): a TCP packet that is not a
/// SYN and finds no entry (evicted, expired) chooses its backend with it, so with an unchanged
/// set of backends it lands where its connection was. Deterministic across nodes, restarts and
/// program versions; not keyed, since it only spreads flows that lost their entry.
#[inline]
#[must_use]
pub fn flow_hash(key: &CtKey) -> u32 {
    #[inline]
    const fn word(a: &Addr, i: usize) -> u32 {
        u32::from_le_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]])
    }
    #[inline]
    const fn mix(h: u32, w: u32) -> u32 {
        (h ^ w).wrapping_mul(0x9e37_79b1).rotate_left(13)
    }
    let mut h: u32 = 0x811c_9dc5 ^ u32::from(key.proto) ^ (u32::from(key.family) << 8);
    let mut i = 0;
    while i < 16 {
        h = mix(h, word(&key.src, i));
        h = mix(h, word(&key.dst, i));
        i += 4;
    }
    h = mix(h, u32::from(key.sport.0) | (u32::from(key.dport.0) << 16));
    // murmur3's finaliser: every input bit reaches every output bit.
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::{FAMILY_V4, from_v4};

    const CLIENT: [u8; 4] = [198, 18, 1, 10];
    const VIP: [u8; 4] = [198, 19, 0, 1];
    const BACKEND: [u8; 4] = [198, 18, 2, 10];

    fn fwd(client: [u8; 4]) -> CtKey {
        CtKey {
            src: from_v4(client),
            dst: from_v4(VIP),
            sport: Be16::from_host(40000),
            dport: Be16::from_host(80),
            proto: 6,
            family: FAMILY_V4,
            dir: dir::FORWARD,
            _pad: 0,
        }
    }

    fn value(addr: [u8; 4], port: u16, st: u8) -> CtValue {
        CtValue {
            addr: from_v4(addr),
            port: Be16::from_host(port),
            state: st,
            backend_id: 7,
            frontend_id: 3,
            last_seen_ns: 99,
            ..CtValue::default()
        }
    }

    #[test]
    fn reply_and_forward_keys_are_each_others_peers() {
        let key = fwd(CLIENT);
        let forward = value(BACKEND, 8080, state::FIN_FORWARD);
        let reply = reply_key(&key, &forward.addr, forward.port);
        assert_eq!(reply.dir, dir::REPLY);
        assert_eq!(reply.src, from_v4(BACKEND));
        assert_eq!(reply.dst, from_v4(CLIENT));
        assert_eq!(reply.sport, Be16::from_host(8080));
        assert_eq!(reply.dport, Be16::from_host(40000));
        assert_eq!(peer_key(&key, &forward), reply);
        let reply_value = value(VIP, 80, state::FIN_FORWARD);
        let (back, rebuilt) = forward_of(&reply, &reply_value);
        assert_eq!(back, key);
        assert_eq!(rebuilt, forward);
        assert_eq!(peer_key(&reply, &reply_value), key);
    }

    #[test]
    fn a_hairpinned_flows_legs_are_each_others_peers() {
        let key = fwd(CLIENT);
        // The client is its own backend.
        let forward = value(CLIENT, 8080, 0);
        let leg = reply_key(&key, &forward.addr, forward.port);
        assert_eq!(leg.dir, dir::FORWARD);
        assert_eq!(leg.src, from_v4(CLIENT));
        assert_eq!(leg.dst, from_v4(VIP));
        let leg_value = value(VIP, 80, state::HAIRPIN_REPLY);
        assert!(is_reply_leg(&leg, &leg_value));
        assert!(!is_reply_leg(&key, &forward));
        let (back, rebuilt) = forward_of(&leg, &leg_value);
        assert_eq!(back, key);
        assert_eq!(rebuilt, forward);
        assert_eq!(peer_key(&key, &forward), leg);
    }

    #[test]
    fn timeouts_follow_table_protocol_and_state() {
        let (tcp, udp) = (6, 17);
        assert_eq!(idle_timeout_ns(false, tcp, 0), timeout::TCP_ESTABLISHED_NS);
        // One direction's FIN changes nothing (half-close); both, or a reset, do.
        assert_eq!(
            idle_timeout_ns(false, tcp, state::FIN_FORWARD),
            timeout::TCP_ESTABLISHED_NS
        );
        assert_eq!(
            idle_timeout_ns(false, tcp, state::CLOSING),
            timeout::TCP_CLOSING_NS
        );
        assert_eq!(idle_timeout_ns(true, tcp, 0), timeout::UNREPLIED_NS);
        assert_eq!(
            idle_timeout_ns(true, tcp, state::CLOSING),
            timeout::TCP_CLOSING_NS
        );
        assert_eq!(idle_timeout_ns(false, udp, 0), timeout::OTHER_NS);
        assert_eq!(idle_timeout_ns(true, udp, 0), timeout::UNREPLIED_NS);
    }

    #[test]
    fn flow_hash_depends_on_every_part_of_the_tuple() {
        let base = fwd(CLIENT);
        let h = flow_hash(&base);
        assert_eq!(h, flow_hash(&base), "deterministic");
        let mut other = base;
        other.sport = Be16::from_host(40001);
        assert_ne!(h, flow_hash(&other));
        let mut other = base;
        other.src[3] = 11;
        assert_ne!(h, flow_hash(&other));
        let mut other = base;
        other.dport = Be16::from_host(81);
        assert_ne!(h, flow_hash(&other));
        // Spread: 4,000 client ports over 3 slots, each slot within 10 % of a third.
        let mut slots = [0u32; 3];
        for port in 30000..34000 {
            let mut k = base;
            k.sport = Be16::from_host(port);
            slots[(flow_hash(&k) % 3) as usize] += 1;
        }
        assert!(slots.iter().all(|n| n.abs_diff(1333) < 133), "{slots:?}");
    }
}
