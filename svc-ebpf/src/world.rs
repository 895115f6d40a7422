//! TEMPORARY placeholder for the node-facing TC path (replaced by the real `world.rs` at
//! merge): both programs let every packet continue the TCX chain untouched, so the agent's
//! interface roles can be built and tested with the entry points in place.

use aya_ebpf::programs::TcContext;

/// Placeholder: every packet from the outside world continues the TCX chain untouched.
#[inline(always)]
pub fn from_world(_: &TcContext) -> i32 {
    crate::pod::TCX_NEXT
}

/// Placeholder: every packet to the outside world continues the TCX chain untouched.
#[inline(always)]
pub fn to_world(_: &TcContext) -> i32 {
    crate::pod::TCX_NEXT
}
