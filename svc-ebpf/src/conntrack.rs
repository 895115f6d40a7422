//! The connection table: a translated flow keeps its backend, and replies find their way back
//! to the service address. Entries are created as a pair (forward + reply) in `CT_NEW_V1`,
//! move to `CT_V1` when the backend first answers, and expire when idle (see
//! `svc_common::conntrack`).

use core::mem::MaybeUninit;

use aya_ebpf::{bindings::BPF_ANY, maps::LruHashMap};
use svc_common::{
    Be16,
    conntrack::{
        CtKey, CtValue, addr_eq, dir, forward_of, idle_timeout_ns, is_reply_leg, peer_key,
        reply_key, state,
    },
    net::ipproto,
    service::{Backend, backend_flags},
    stats::DropReason,
};

use crate::{
    lb::Chosen,
    maps::{CT_NEW_V1, CT_V1},
    parse::{Parsed, tcp_flags},
};

/// `last_seen` is rewritten at most this often, so busy flows do not write on every packet.
const REFRESH_NS: u64 = 1_000_000_000;

/// One of the two connection tables.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// `CT_V1`: flows the backend answered.
    Answered,
    /// `CT_NEW_V1`: flows nothing answered yet.
    Unanswered,
}

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
fn idle_timeout(table: Table, proto: u8, st: u8) -> u64 {
    idle_timeout_ns(table == Table::Unanswered, proto, st)
}

/// Finds a live entry for `key` in `table`, refreshing it, and copies it to `out`. A FIN
/// records its direction; the second direction's FIN, or a reset, puts the flow on the short
/// timeout. Both entries of the pair get the new state, so the backend's half of a half-closed
/// connection keeps its entry. A subprogram of its own: callers keep one value on their stack,
/// uninitialised (`out` is written exactly when an entry is found): zeroing it first was a call
/// to a byte-at-a-time `memset` on every packet (bpf-linker has LLVM expand `memset` as a call).
#[inline(never)]
pub fn ct_lookup(
    table: Table,
    key: &CtKey,
    pkt: &Parsed,
    now: u64,
    out: &mut MaybeUninit<CtValue>,
) -> bool {
    match table {
        Table::Answered => lookup_in(&CT_V1, table, key, pkt, now, out),
        Table::Unanswered => lookup_in(&CT_NEW_V1, table, key, pkt, now, out),
    }
}

#[inline(always)]
fn lookup_in(
    map: &LruHashMap<CtKey, CtValue>,
    table: Table,
    key: &CtKey,
    pkt: &Parsed,
    now: u64,
    out: &mut MaybeUninit<CtValue>,
) -> bool {
    let Some(entry) = map.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: the pointer is into the map's value; concurrent updates of these plain fields
    // can only lose a refresh or a state bit, never corrupt the entry.
    unsafe {
        let old = (*entry).state;
        if now.saturating_sub((*entry).last_seen_ns) > idle_timeout(table, pkt.proto, old) {
            return false;
        }
        let st = closing_state(key, &*entry, pkt.tcp_flags);
        let changed = st != old;
        if changed {
            (*entry).state = st;
            (*entry).last_seen_ns = now;
        } else if now.saturating_sub((*entry).last_seen_ns) > REFRESH_NS {
            (*entry).last_seen_ns = now;
        }
        let out = out.write(*entry);
        if changed {
            ct_sync_peer(table, key, out);
        }
    }
    true
}

/// The state of `key`'s entry after a packet with `flags` in the entry's direction: a FIN
/// marks that direction; both directions' FINs or a reset make the flow closing.
#[inline(always)]
fn closing_state(key: &CtKey, entry: &CtValue, flags: u8) -> u8 {
    let mut st = entry.state;
    if flags & tcp_flags::FIN != 0 {
        st |= if is_reply_leg(key, entry) {
            state::FIN_REPLY
        } else {
            state::FIN_FORWARD
        };
    }
    let both = state::FIN_FORWARD | state::FIN_REPLY;
    if flags & tcp_flags::RST != 0 || st & both == both {
        st |= state::CLOSING;
    }
    st
}

/// Gives the other entry of `value`'s pair its FIN and closing bits (and, when closing, the
/// time the close timeout starts from). Only FINs and resets get here. A subprogram of its own:
/// the peer's key needs a frame.
#[inline(never)]
fn ct_sync_peer(table: Table, key: &CtKey, value: &CtValue) {
    let peer = peer_key(key, value);
    match table {
        Table::Answered => or_state(&CT_V1, &peer, value),
        Table::Unanswered => or_state(&CT_NEW_V1, &peer, value),
    }
}

#[inline(always)]
fn or_state(map: &LruHashMap<CtKey, CtValue>, peer: &CtKey, value: &CtValue) {
    if let Some(entry) = map.get_ptr_mut(peer) {
        // SAFETY: a pointer into the map's value; a racing update can only lose a bit.
        unsafe {
            (*entry).state |= value.state & state::ENDING;
            if value.state & state::CLOSING != 0 {
                (*entry).last_seen_ns = value.last_seen_ns;
            }
        }
    }
}

/// Forgets the pair `key`/`value` belongs to in `table` (a new connection on a reused tuple,
/// or a flow whose backend is gone, chooses again: none of its packets may meet the old pair).
#[inline(never)]
pub fn ct_remove_pair(table: Table, key: &CtKey, value: &CtValue) {
    let peer = peer_key(key, value);
    // One call per table (never a map pointer chosen at run time).
    match table {
        Table::Answered => {
            let _ = CT_V1.remove(key);
            let _ = CT_V1.remove(&peer);
        }
        Table::Unanswered => {
            let _ = CT_NEW_V1.remove(key);
            let _ = CT_NEW_V1.remove(&peer);
        }
    }
}

/// Records a new translated flow in `CT_NEW_V1`: the forward entry (client -> VIP, the
/// packet's own tuple) and its reply entry (backend -> client), once the reply tuple is the
/// flow's own ([`ct_claim_reply`]). If the reply entry cannot be stored, the
/// forward one is removed again. A subprogram of its own, so its keys and values
/// get their own stack frame (one value, reused for both entries: the pod path's deepest
/// call chain ends here).
#[inline(never)]
pub fn ct_create(pkt: &Parsed, chosen: &Chosen, now: u64) -> Result<(), DropReason> {
    let fwd = ct_key(pkt, dir::FORWARD);
    let backend = &chosen.backend;
    let reply_key = reply_key(&fwd, &backend.addr, backend.port);
    ct_claim_reply(&reply_key, &fwd, now)?;
    // A flow first seen mid-way (its entry was lost) may be closing already.
    let mut st = 0;
    if pkt.tcp_flags & tcp_flags::FIN != 0 {
        st |= state::FIN_FORWARD;
    }
    if pkt.tcp_flags & tcp_flags::RST != 0 {
        st |= state::CLOSING;
    }
    let mut value = CtValue {
        addr: backend.addr,
        port: backend.port,
        state: st,
        _pad: 0,
        backend_id: chosen.backend_id,
        frontend_id: chosen.frontend_id,
        snat_port: Be16(0),
        _pad2: 0,
        last_seen_ns: now,
    };
    CT_NEW_V1
        .insert(&fwd, &value, u64::from(BPF_ANY))
        .map_err(|_| DropReason::CtInsertFailed)?;
    value.addr = pkt.dst;
    value.port = Be16(pkt.dport);
    if reply_key.dir == dir::FORWARD {
        value.state |= state::HAIRPIN_REPLY;
    }
    if CT_NEW_V1
        .insert(&reply_key, &value, u64::from(BPF_ANY))
        .is_err()
    {
        let _ = CT_NEW_V1.remove(&fwd);
        return Err(DropReason::CtInsertFailed);
    }
    Ok(())
}

/// Makes the reply tuple `reply` of the new flow `fwd` its own, in both tables. The backend
/// sees the client's address and port, not the VIP: a client that used the same source port
/// towards another frontend with the same backend (another VIP or service port) gives both
/// flows one reply tuple, and a reply must find the entry of its own flow (the answered table
/// is asked first: an old pair there would give the new flow's SYN-ACK the old VIP).
///
/// An entry of another flow whose connection is closed (both FINs, or a reset) or idle past its
/// timeout goes, with its pair, as kernel conntrack reuses the tuple of a closed connection; a
/// live one keeps the tuple, and the new flow is dropped ([`DropReason::CtReplyClash`]). The
/// reply leg of a hairpinned flow is keyed with the VIP: it cannot clash.
#[inline(always)]
fn ct_claim_reply(reply: &CtKey, fwd: &CtKey, now: u64) -> Result<(), DropReason> {
    if reply.dir != dir::REPLY {
        return Ok(());
    }
    claim_in(&CT_V1, Table::Answered, reply, fwd, now)?;
    claim_in(&CT_NEW_V1, Table::Unanswered, reply, fwd, now)
}

#[inline(always)]
fn claim_in(
    map: &LruHashMap<CtKey, CtValue>,
    table: Table,
    reply: &CtKey,
    fwd: &CtKey,
    now: u64,
) -> Result<(), DropReason> {
    let Some(entry) = map.get_ptr(reply) else {
        return Ok(());
    };
    // SAFETY: a pointer into the map's value, read before the entry is removed.
    let entry = unsafe { &*entry };
    // The key fixes backend, client and client port; the value of a reply entry names the VIP
    // and service port its flow was sent to: that flow's forward key.
    let owner = CtKey {
        dst: entry.addr,
        dport: entry.port,
        dir: dir::FORWARD,
        ..*fwd
    };
    if addr_eq(&owner.dst, &fwd.dst) && owner.dport == fwd.dport {
        return Ok(());
    }
    let idle = now.saturating_sub(entry.last_seen_ns);
    if idle <= idle_timeout(table, reply.proto, entry.state) && entry.state & state::CLOSING == 0 {
        return Err(DropReason::CtReplyClash);
    }
    let _ = map.remove(reply);
    let _ = map.remove(&owner);
    Ok(())
}

/// The backend answered the flow whose reply leg `key`/`value` was found in `CT_NEW_V1` (and
/// just refreshed): the pair moves to `CT_V1` (both entries rebuilt from the reply leg, forward
/// first, removed again if the reply leg cannot be stored) and leaves `CT_NEW_V1`. A failed
/// move leaves the pair where it was, still working. A reset is no answer (the caller does not
/// promote on one): a refused connection stays in the table of unanswered flows.
#[inline(never)]
pub fn ct_promote(key: &CtKey, value: &CtValue) {
    let (fwd_key, fwd) = forward_of(key, value);
    if CT_V1.insert(&fwd_key, &fwd, u64::from(BPF_ANY)).is_err() {
        return;
    }
    if CT_V1.insert(key, value, u64::from(BPF_ANY)).is_err() {
        let _ = CT_V1.remove(&fwd_key);
        return;
    }
    let _ = CT_NEW_V1.remove(&fwd_key);
    let _ = CT_NEW_V1.remove(key);
}

/// As [`ct_promote`], from the forward entry `fwd`/`value` of a pair in `CT_NEW_V1` (an external
/// flow's client sent its second packet): the reply leg is rebuilt from it (`peer_key`, the VIP
/// and service port of the forward key as its value). A subprogram of its own, calling no other
/// (it ends a call chain that is near the verifier's stack limit).
#[inline(never)]
pub fn ct_promote_forward(fwd: &CtKey, value: &CtValue) {
    let reply = peer_key(fwd, value);
    let back = CtValue {
        addr: fwd.dst,
        port: fwd.dport,
        ..*value
    };
    if CT_V1.insert(fwd, value, u64::from(BPF_ANY)).is_err() {
        return;
    }
    if CT_V1.insert(&reply, &back, u64::from(BPF_ANY)).is_err() {
        let _ = CT_V1.remove(fwd);
        return;
    }
    let _ = CT_NEW_V1.remove(fwd);
    let _ = CT_NEW_V1.remove(&reply);
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

/// Whether `pkt` is a SYN without ACK: a client opening a connection (or retransmitting the
/// SYN that opens it).
#[inline(always)]
pub fn is_syn(pkt: &Parsed) -> bool {
    pkt.proto == ipproto::TCP && pkt.tcp_flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN
}

/// Whether a SYN that matched `entry` opens a new connection on a reused tuple: the entry's
/// connection is ending (a FIN or reset was seen). Such a SYN chooses from the current
/// backends, as kernel conntrack starts a new connection on a SYN to a closed tuple; a SYN
/// on an entry of a connection that never ended is a retransmission and keeps its backend.
#[inline(always)]
pub fn ct_syn_opens_new(pkt: &Parsed, entry: &CtValue) -> bool {
    is_syn(pkt) && entry.state & state::ENDING != 0
}

/// Whether a packet that matched a forward entry whose backend is `backend` opens a new TCP
/// connection that must choose again: a SYN without ACK (the tuple was reused after its
/// connection closed, or the client retransmits a SYN nothing answered) towards a terminating
/// backend. Terminating backends keep their established connections but take no new ones
/// (while the frontend has ready backends; when it has none, the new choice is among the
/// terminating ones again). Cilium's service path does the same.
#[inline(always)]
pub fn ct_syn_leaves_terminating(pkt: &Parsed, backend: &Backend) -> bool {
    is_syn(pkt) && backend.flags & backend_flags::TERMINATING != 0
}
