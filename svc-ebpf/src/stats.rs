//! Counter updates.

use aya_ebpf::maps::{PerCpuArray, PerCpuHashMap};
use svc_common::stats::{Counter, DropReason, PktCounter};

use crate::maps::{BACKEND_STATS_V1, DROP_STATS_V1, PKT_STATS_V1, SVC_STATS_V1};

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

/// Adds one packet of `len` bytes to drop reason `r` (and to the `dropped` counter).
#[inline(always)]
pub fn count_drop(r: DropReason, len: u32) {
    add(&DROP_STATS_V1, r as u32, len);
    add(&PKT_STATS_V1, PktCounter::Dropped as u32, len);
}

/// Adds one packet of `len` bytes to this CPU's share of entry `id`, if the agent created it.
#[inline(always)]
fn add_keyed(map: &PerCpuHashMap<u32, Counter>, id: u32, len: u32) {
    if let Some(slot) = map.get_ptr_mut(id) {
        // SAFETY: this CPU's copy of the value, touched by no other CPU.
        unsafe {
            (*slot).packets += 1;
            (*slot).bytes += u64::from(len);
        }
    }
}

/// Counts one translated packet of `len` bytes for its frontend and its backend.
#[inline(always)]
pub fn count_translated(frontend_id: u32, backend_id: u32, len: u32) {
    add_keyed(&SVC_STATS_V1, frontend_id, len);
    add_keyed(&BACKEND_STATS_V1, backend_id, len);
}
