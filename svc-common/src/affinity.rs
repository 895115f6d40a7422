//! `ClientIP` session affinity.
//!
//! Map `AFFINITY_V1` (LRU hash; written and read by the kernel programs; the agent only deletes
//! the entries of backends that left their frontend): key [`AffinityKey`]
//! (client address, frontend id), value [`AffinityValue`] (the backend the client was sent
//! to, and when). An entry is honoured while younger than the frontend's affinity timeout
//! (refreshed on use) and while its backend may still take new connections from this
//! frontend (exists; not terminating unless the frontend serves from terminating endpoints;
//! local when the frontend is local-only). Addresses network order, the rest host order.

use crate::{addr::Addr, impl_pod, service::Backend};

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
    /// [`fingerprint`] of the frontend and backend the entry was written for: the entry is
    /// honoured only while `backend_id` still names that backend for that frontend (an id
    /// reissued to another backend, or a frontend id to another frontend, does not inherit the
    /// client). 0: written before the check existed (this field was padding, always zero),
    /// honoured by id alone.
    pub check: u32,
    /// Last use, `CLOCK_MONOTONIC` ns (`bpf_ktime_get_ns`; the TC path reads the coarse
    /// `bpf_ktime_get_coarse_ns`, the same clock at the last tick).
    pub last_used_ns: u64,
}
crate::assert_layout!(
    AffinityValue,
    size = 16,
    backend_id = 0,
    check = 4,
    last_used_ns = 8
);

/// Mixes one 32-bit word into `h` (multiply-rotate, as in `MurmurHash3`'s body).
#[expect(
    clippy::inline_always,
    reason = "the kernel programs call it from a function whose stack is at its limit: it must not become a BPF-to-BPF call"
)]
#[inline(always)]
const fn mix(h: u32, w: u32) -> u32 {
    (h ^ w).wrapping_mul(0x9e37_79b1).rotate_left(13)
}

/// The `i`th 32-bit word of an address (`i` < 4).
#[expect(
    clippy::inline_always,
    reason = "the kernel programs call it from a function whose stack is at its limit: it must not become a BPF-to-BPF call"
)]
#[inline(always)]
const fn word(a: &Addr, i: usize) -> u32 {
    u32::from_ne_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]])
}

/// The [`AffinityValue::check`] of an entry sending a client of the frontend `frontend_id` to
/// `backend` (address, port, family). Never 0 (which marks an entry written without a check).
/// Computed by the kernel when it writes an entry and again when it reads one; not secret, only
/// a guard against a backend id that came to name another backend (a collision, 1 in 2^32,
/// leaves the id-only behaviour). The frontend is known by its id (also in the key): frontend
/// ids are not reissued while an entry can live (the agent persists its id cursors).
#[expect(
    clippy::inline_always,
    reason = "the kernel programs call it from a function whose stack is at its limit: it must not become a BPF-to-BPF call"
)]
#[inline(always)]
#[must_use]
pub fn fingerprint(frontend_id: u32, backend: &Backend) -> u32 {
    let mut h = mix(0x811c_9dc5, frontend_id);
    let mut i = 0;
    while i < 4 {
        h = mix(h, word(&backend.addr, i));
        i += 1;
    }
    h = mix(
        h,
        u32::from(backend.port.0) | u32::from(backend.family) << 16,
    );
    if h == 0 { 1 } else { h }
}

impl_pod!(AffinityKey, AffinityValue);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Be16, addr::from_v4};

    fn be(ip: [u8; 4], port: u16) -> Backend {
        Backend {
            addr: from_v4(ip),
            port: Be16::from_host(port),
            family: 4,
            ..Backend::default()
        }
    }

    #[test]
    fn the_fingerprint_names_frontend_and_backend() {
        let base = fingerprint(7, &be([198, 18, 2, 10], 5000));
        assert_ne!(base, 0);
        assert_eq!(
            base,
            fingerprint(7, &be([198, 18, 2, 10], 5000)),
            "deterministic"
        );
        for other in [
            fingerprint(8, &be([198, 18, 2, 10], 5000)),
            fingerprint(7, &be([198, 18, 2, 11], 5000)),
            fingerprint(7, &be([198, 18, 2, 10], 5001)),
            fingerprint(
                7,
                &Backend {
                    family: 6,
                    ..be([198, 18, 2, 10], 5000)
                },
            ),
        ] {
            assert_ne!(other, base);
        }
    }
}
