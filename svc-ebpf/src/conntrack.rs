//! The connection table: a translated flow keeps its backend, and replies find their way back
//! to the service address. Entries are created as a pair (forward + reply) and expire when idle.

use aya_ebpf::bindings::BPF_ANY;
use svc_common::{
    Be16,
    addr::Addr,
    conntrack::{CtKey, CtValue, dir, state, timeout},
    net::ipproto,
    service::{Backend, backend_flags},
    stats::DropReason,
};

use crate::{
    lb::Chosen,
    maps::CT_V1,
    parse::{Parsed, tcp_flags},
};

/// `last_seen` is rewritten at most this often, so busy flows do not write on every packet.
const REFRESH_NS: u64 = 1_000_000_000;

/// The key of the packet's own tuple in direction `d`.
#[inline(always)]
pub fn ct_key(pkt: &Parsed, d: u8) -> CtKey {
    CtKey {
        src: pkt.src,
        dst: pkt.dst,
        sport: Be16(pkt.sport),
        dport: Be16(pkt.dport),
        proto: pkt.proto,
        family: pkt.family,
        dir: d,
        _pad: 0,
    }
}

#[inline(always)]
fn idle_timeout(proto: u8, st: u8) -> u64 {
    if proto != ipproto::TCP {
        timeout::OTHER_NS
    } else if st & state::CLOSING != 0 {
        timeout::TCP_CLOSING_NS
    } else {
        timeout::TCP_ESTABLISHED_NS
    }
}

/// Finds a live entry for `key`, refreshing it; FIN/RST move it to the short timeout, and a
/// SYN on a closing entry (a new connection on a reused tuple) moves it back to the long one.
#[inline(always)]
pub fn ct_lookup(key: &CtKey, pkt: &Parsed, now: u64) -> Option<CtValue> {
    let entry = CT_V1.get_ptr_mut(key)?;
    // SAFETY: the pointer is into the map's value; concurrent updates of these plain fields
    // can only lose a refresh or a state bit, never corrupt the entry.
    unsafe {
        if now.saturating_sub((*entry).last_seen_ns) > idle_timeout(pkt.proto, (*entry).state) {
            return None;
        }
        if pkt.tcp_flags & (tcp_flags::FIN | tcp_flags::RST) != 0 {
            (*entry).state |= state::CLOSING;
            (*entry).last_seen_ns = now;
        } else if pkt.tcp_flags & tcp_flags::SYN != 0 && (*entry).state & state::CLOSING != 0 {
            (*entry).state &= !state::CLOSING;
            (*entry).last_seen_ns = now;
        } else if now.saturating_sub((*entry).last_seen_ns) > REFRESH_NS {
            (*entry).last_seen_ns = now;
        }
        Some(*entry)
    }
}

/// Records a new translated flow: the forward entry `fwd` (client -> VIP) and its reply entry
/// (backend -> client). If the reply entry cannot be stored, the forward one is removed again.
/// A subprogram of its own, so its keys and values get their own stack frame.
#[inline(never)]
pub fn ct_create(pkt: &Parsed, fwd: &CtKey, chosen: &Chosen, now: u64) -> Result<(), DropReason> {
    let st = if pkt.tcp_flags & (tcp_flags::FIN | tcp_flags::RST) != 0 {
        state::CLOSING
    } else {
        0
    };
    let backend = &chosen.backend;
    let entry = |addr, port, state| CtValue {
        addr,
        port,
        state,
        _pad: 0,
        backend_id: chosen.backend_id,
        frontend_id: chosen.frontend_id,
        _pad2: 0,
        last_seen_ns: now,
    };
    let forward = entry(backend.addr, backend.port, st);
    // Hairpin (the client is its own backend): the reply leaves the pod towards the VIP, the
    // source the forward leg was given; otherwise it comes from the backend to the client.
    let hairpin = addr_eq(&backend.addr, &pkt.src);
    let reply_key = CtKey {
        src: backend.addr,
        dst: if hairpin { pkt.dst } else { pkt.src },
        sport: backend.port,
        dport: Be16(pkt.sport),
        proto: pkt.proto,
        family: pkt.family,
        dir: if hairpin { dir::FORWARD } else { dir::REPLY },
        _pad: 0,
    };
    let reply = entry(
        pkt.dst,
        Be16(pkt.dport),
        st | if hairpin { state::HAIRPIN_REPLY } else { 0 },
    );
    CT_V1
        .insert(fwd, &forward, u64::from(BPF_ANY))
        .map_err(|_| DropReason::CtInsertFailed)?;
    if CT_V1
        .insert(&reply_key, &reply, u64::from(BPF_ANY))
        .is_err()
    {
        let _ = CT_V1.remove(fwd);
        return Err(DropReason::CtInsertFailed);
    }
    Ok(())
}

/// Whether a forward entry still points at a backend the agent holds (same address and port:
/// ids are never reused while entries may point at them, but the check is cheap).
///
/// A backend that is gone (removed from every slice) fails this check, and the packet chooses
/// a new backend as if its flow were new: the lazy fallback for state the agent did not clear
/// (the agent deletes the entries of UDP flows to removed backends at once; TCP flows to a
/// gone backend are answered with a reset by whichever backend gets the next segment).
#[inline(always)]
pub fn ct_backend_alive(entry: &CtValue, current: Option<Backend>) -> bool {
    match current {
        Some(b) => addr_eq(&b.addr, &entry.addr) && b.port == entry.port,
        None => false,
    }
}

/// Whether a packet that matched a forward entry whose backend is `backend` opens a new TCP
/// connection that must choose again: a SYN without ACK (the tuple was reused after its
/// connection closed, or the client retransmits a SYN nothing answered) towards a terminating
/// backend. Terminating backends keep their established connections but take no new ones
/// (while the frontend has ready backends; when it has none, the new choice is among the
/// terminating ones again). Cilium's service path does the same.
#[inline(always)]
pub fn ct_syn_leaves_terminating(pkt: &Parsed, backend: &Backend) -> bool {
    pkt.proto == ipproto::TCP
        && pkt.tcp_flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN
        && backend.flags & backend_flags::TERMINATING != 0
}

#[inline(always)]
fn addr_eq(a: &Addr, b: &Addr) -> bool {
    let mut i = 0;
    while i < 16 {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}
