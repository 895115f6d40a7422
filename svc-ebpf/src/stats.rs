//! Counter updates.

use svc_common::stats::PktCounter;

use crate::maps::PKT_STATS_V1;

/// Adds one packet of `len` bytes to counter `c` on this CPU.
#[inline(always)]
pub fn count(c: PktCounter, len: u32) {
    if let Some(slot) = PKT_STATS_V1.get_ptr_mut(c as u32) {
        // SAFETY: a per-CPU slot is only touched by this CPU, and programs are not preempted
        // by another program on the same CPU while they update it.
        unsafe {
            (*slot).packets += 1;
            (*slot).bytes += u64::from(len);
        }
    }
}
