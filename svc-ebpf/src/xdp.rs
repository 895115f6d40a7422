//! The node-facing XDP path (`--xdp native|generic`): traffic from outside, decided before the
//! kernel builds a socket buffer for it.
//!
//! From the world: parse -> the node-facing decision (`world::decide`, the very steps the TC
//! program takes, on the XDP buffer) ->
//! - translated and SNAT'd to an endpoint on another node, or the reply of such a flow: routed
//!   (`world::forward_route`) and sent back out here (`XDP_TX`) or out of the route's interface
//!   (`XDP_REDIRECT`), never reaching the stack;
//! - translated for an endpoint of this node: passed, its decision in the metadata
//!   (`svc_common::handoff`), so the TC program lets it through without deciding again;
//! - translated, but the next hop's neighbour entry is not resolved: passed with the decision
//!   "send it on", which TC does (`bpf_redirect_neigh`; XDP cannot resolve neighbours);
//! - dropped for a reason (source ranges, no local endpoint, SNAT failures): dropped, counted;
//! - anything else (not for an external frontend, a frontend without endpoints to reject,
//!   fragments, other protocols): passed untouched and uncounted, and TC decides it exactly as
//!   with XDP off. Both programs read the same maps, and a flow XDP started has its conntrack
//!   entries, so TC never chooses differently for it.
//!
//! Frames are taken as they arrive on a wire: complete checksums (see `frame`).

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    helpers::{bpf_redirect, bpf_xdp_adjust_meta},
    programs::XdpContext,
};
use svc_common::{
    addr::FAMILY_V4,
    handoff,
    stats::{DropReason, PktCounter},
};

use crate::{
    frame::Frame as _,
    parse, stats,
    world::{Decision, Route, decide, forward_route},
};

/// Handles one frame arriving from outside. Returns the XDP action.
#[inline(always)]
pub fn from_world(ctx: &XdpContext) -> u32 {
    let pkt = parse::parse(ctx);
    let decision = decide(ctx, &pkt);
    if matches!(decision, Decision::Untouched | Decision::Reject) {
        // TC counts and decides it.
        return XDP_PASS;
    }
    let len = ctx.len();
    stats::count(PktCounter::Xdp, len);
    stats::count(pkt.l3, len);
    if let Some(l4) = pkt.l4 {
        stats::count(l4, len);
    }
    match decision {
        Decision::Delivered => hand_off(ctx, handoff::DELIVERED),
        Decision::Forward => send_on(ctx, pkt.family),
        Decision::Drop(reason) => drop(reason, len),
        Decision::Untouched | Decision::Reject => XDP_PASS,
    }
}

/// Sends a translated frame on: back out of this interface (`XDP_TX`) or out of another one
/// (`XDP_REDIRECT`) when the next hop is resolved; else to TC, which resolves it.
#[inline(always)]
fn send_on(ctx: &XdpContext, family: u8) -> u32 {
    match forward_route(ctx, family) {
        Ok(Route::Resolved(ifindex)) if ifindex == crate::frame::Frame::ingress_ifindex(ctx) => {
            XDP_TX
        }
        Ok(Route::Resolved(ifindex)) => {
            // SAFETY: no preconditions; returns the action (`XDP_REDIRECT`, or `XDP_ABORTED`
            // for an ifindex it cannot use).
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "an XDP action"
            )]
            let action = unsafe { bpf_redirect(ifindex, 0) } as u32;
            action
        }
        Ok(Route::Unresolved(_)) => {
            let word = if family == FAMILY_V4 {
                handoff::FORWARD_V4
            } else {
                handoff::FORWARD_V6
            };
            hand_off(ctx, word)
        }
        Err(reason) => drop(reason, ctx.len()),
    }
}

/// Passes the frame to the stack with `word` in its metadata, for the TC program. A driver
/// that keeps no metadata: a translated frame cannot go on untold (TC would not know it is
/// translated), so it is dropped, counted `xdp_handoff`.
#[inline(always)]
fn hand_off(ctx: &XdpContext, word: u32) -> u32 {
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_possible_wrap,
        reason = "4 fits an i32"
    )]
    const DELTA: i32 = -(handoff::META_LEN as i32);
    // SAFETY: `ctx.ctx` is this program's context.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, DELTA) } != 0 {
        return drop(DropReason::XdpHandoff, ctx.len());
    }
    let meta = ctx.metadata();
    if meta + handoff::META_LEN > ctx.data() {
        return drop(DropReason::XdpHandoff, ctx.len());
    }
    // SAFETY: the 4 bytes before the frame are the metadata, checked above.
    unsafe { (meta as *mut u32).write_unaligned(word) };
    XDP_PASS
}

/// Drops the frame, counted under `reason`.
#[inline(always)]
fn drop(reason: DropReason, len: u32) -> u32 {
    stats::count_drop(reason, len);
    XDP_DROP
}
