//! The pod-facing TC path: packets entering the host from a pod's veth.
//!
//! The story, top to bottom: make the headers readable -> parse -> count. Service translation
//! (service lookup -> connection table -> backend choice -> rewrite) plugs in after the parse.

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};

use crate::{parse, stats};

/// Handles one packet from a pod. Returns the TC verdict.
#[inline(always)]
pub fn from_pod(ctx: &TcContext) -> i32 {
    parse::pull_headers(ctx);
    let pkt = parse::parse(ctx);
    stats::count(pkt.l3, ctx.len());
    if let Some(l4) = pkt.l4 {
        stats::count(l4, ctx.len());
    }
    TC_ACT_OK
}
