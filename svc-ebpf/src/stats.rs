//! Counter updates.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    maps::{PerCpuArray, PerCpuHashMap},
};
use svc_common::stats::{Counter, DropReason, Pending, PktCounter, pending_slot};

use crate::maps::{BACKEND_STATS_V1, DROP_STATS_V1, PENDING_STATS_V1, PKT_STATS_V1, SVC_STATS_V1};

#[inline(always)]
fn add(map: &PerCpuArray<Counter>, index: u32, len: u32) {
    if let Some(slot) = map.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot is only touched by this CPU, and programs are not preempted
        // by another program on the same CPU while they update it.
        unsafe {
            (*slot).packets += 1;
            (*slot).bytes += u64::from(len);
        }
    }
}

/// Adds one packet of `len` bytes to counter `c` on this CPU.
#[inline(always)]
pub fn count(c: PktCounter, len: u32) {
    add(&PKT_STATS_V1, c as u32, len);
}

/// [`count`] as a subprogram of its own: its key takes no room in the caller's frame (for
/// callers on a call chain at the verifier's stack limit).
#[inline(never)]
pub fn count_apart(c: PktCounter, len: u32) {
    count(c, len);
}

/// Adds one packet of `len` bytes to drop reason `r` (and to the `dropped` counter).
#[inline(always)]
pub fn count_drop(r: DropReason, len: u32) {
    add(&DROP_STATS_V1, r as u32, len);
    add(&PKT_STATS_V1, PktCounter::Dropped as u32, len);
}

/// Adds one packet of `len` bytes to this CPU's share of entry `id`; whether it exists.
#[inline(always)]
fn add_keyed(map: &PerCpuHashMap<u32, Counter>, id: u32, len: u32) -> bool {
    let Some(slot) = map.get_ptr_mut(id) else {
        return false;
    };
    // SAFETY: this CPU's copy of the value, touched by no other CPU.
    unsafe {
        (*slot).packets += 1;
        (*slot).bytes += u64::from(len);
    }
    true
}

/// Creates the counters of a frontend (`backend` false) or backend id with one packet of `len`
/// bytes (this CPU's share; the other CPUs' shares are zero). Another CPU may create it at the
/// same moment: then this packet goes uncounted. A subprogram of its own: the value and key
/// take a stack frame of their own, off the new-flow path's deepest call chain.
#[inline(never)]
fn create_counter(backend: bool, id: u32, len: u32) {
    let first = Counter {
        packets: 1,
        bytes: u64::from(len),
    };
    // One call per map (never a map pointer chosen at run time).
    if backend {
        let _ = BACKEND_STATS_V1.insert(&id, &first, u64::from(BPF_NOEXIST));
    } else {
        let _ = SVC_STATS_V1.insert(&id, &first, u64::from(BPF_NOEXIST));
    }
}

/// Adds `packets` packets of `bytes` bytes to this CPU's share of entry `id`, if it exists.
#[inline(always)]
fn add_many(map: &PerCpuHashMap<u32, Counter>, id: u32, packets: u64, bytes: u64) {
    if let Some(slot) = map.get_ptr_mut(id) {
        // SAFETY: this CPU's copy of the value, touched by no other CPU.
        unsafe {
            (*slot).packets += packets;
            (*slot).bytes += bytes;
        }
    }
}

/// Counts one translated packet of `len` bytes for its frontend and its backend.
///
/// The first packet of a new flow (`new_flow`: the frontend and the backend were just looked
/// up, so their ids are live) adds to the per-id hashes at once, creating missing entries: the
/// agent creates none (an entry of a per-CPU hash costs the kernel's per-CPU allocator about
/// 16 us, which at 120,000 ids was most of a cold sync, and counters of frontends nobody uses
/// take no memory). Packets of established flows add to their pair's slot of
/// `PENDING_STATS_V1` (one array lookup instead of two hash lookups: about 75 ns of an
/// established packet's ~550 here); a slot another pair holds is flushed into the hashes
/// first, adding only to entries that exist, so a flow that outlives its frontend (whose
/// counters the agent deleted) does not bring them back. A subprogram of its own: the callers'
/// frames keep nothing for it.
#[inline(never)]
pub fn count_translated(frontend_id: u32, backend_id: u32, len: u32, new_flow: bool) {
    if new_flow {
        count_new_flow(frontend_id, backend_id, len);
        return;
    }
    let Some(slot) = PENDING_STATS_V1.get_ptr_mut(pending_slot(frontend_id, backend_id)) else {
        return;
    };
    // SAFETY: this CPU's copy of the slot, touched by no other CPU, and programs are not
    // preempted by another program on the same CPU while they update it.
    unsafe {
        let held = *slot;
        if held.packets != 0 && held.frontend_id == frontend_id && held.backend_id == backend_id {
            (*slot).packets = held.packets + 1;
            (*slot).bytes = held.bytes + u64::from(len);
            return;
        }
        *slot = Pending {
            frontend_id,
            backend_id,
            packets: 1,
            bytes: u64::from(len),
        };
        if held.packets != 0 {
            add_many(&SVC_STATS_V1, held.frontend_id, held.packets, held.bytes);
            add_many(&BACKEND_STATS_V1, held.backend_id, held.packets, held.bytes);
        }
    }
}

/// The first packet of a new flow: straight into the per-id hashes, creating what is missing.
#[inline(always)]
fn count_new_flow(frontend_id: u32, backend_id: u32, len: u32) {
    if !add_keyed(&SVC_STATS_V1, frontend_id, len) {
        create_counter(false, frontend_id, len);
    }
    if !add_keyed(&BACKEND_STATS_V1, backend_id, len) {
        create_counter(true, backend_id, len);
    }
}
