//! The pod-facing TC path (the host end of each pod's veth).
//!
//! From a pod (ingress): make the headers readable -> parse -> count -> a flow we already
//! translated keeps its backend (connection table) -> otherwise look the destination up as a
//! service and choose a backend, remembering the choice -> rewrite the destination.
//!
//! To a pod (egress): a reply from a backend gets the service address back as its source.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_ktime_get_ns,
    programs::TcContext,
};
use svc_common::{
    conntrack::dir,
    service::Backend,
    stats::{DropReason, PktCounter},
};

use crate::{
    conntrack::{ct_backend_alive, ct_create, ct_key, ct_lookup},
    lb::{Choice, lb_backend, lb_frontend_key, lb_select_backend},
    nat::{End, nat_rewrite},
    parse, stats,
};

/// Handles one packet from a pod. Returns the TC verdict.
#[inline(always)]
pub fn from_pod(ctx: &TcContext) -> i32 {
    parse::pull_headers(ctx);
    let pkt = parse::parse(ctx);
    stats::count(pkt.l3, ctx.len());
    if let Some(l4) = pkt.l4 {
        stats::count(l4, ctx.len());
    }
    if !pkt.is_tcp_or_udp() {
        return TC_ACT_OK;
    }
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };

    // 1. A flow already translated keeps its backend, as long as the backend exists.
    let fwd = ct_key(&pkt, dir::FORWARD);
    let known =
        ct_lookup(&fwd, &pkt, now).filter(|e| ct_backend_alive(e, lb_backend(e.backend_id)));
    let (addr, port) = if let Some(entry) = known {
        (entry.addr, entry.port.0)
    } else {
        // 2. A new flow: is it for a service? Which backend? Remember the choice.
        let mut chosen = (0, Backend::default());
        let mut key = lb_frontend_key(&pkt);
        match lb_select_backend(&mut key, &mut chosen) {
            Choice::NotService => return TC_ACT_OK,
            Choice::Drop(reason) => return drop(ctx, reason),
            Choice::Backend => {
                if let Err(reason) = ct_create(&pkt, &fwd, chosen.0, &chosen.1, now) {
                    return drop(ctx, reason);
                }
                (chosen.1.addr, chosen.1.port.0)
            }
        }
    };

    // 3. Send it there.
    if nat_rewrite(ctx, &pkt, End::Dst, &addr, port).is_err() {
        return drop(ctx, DropReason::RewriteFailed);
    }
    stats::count(PktCounter::Dnat, ctx.len());
    TC_ACT_OK
}

/// Handles one packet to a pod. Returns the TC verdict.
#[inline(always)]
pub fn to_pod(ctx: &TcContext) -> i32 {
    parse::pull_headers(ctx);
    let pkt = parse::parse(ctx);
    if !pkt.is_tcp_or_udp() {
        return TC_ACT_OK;
    }
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(entry) = ct_lookup(&ct_key(&pkt, dir::REPLY), &pkt, now) else {
        return TC_ACT_OK;
    };
    if nat_rewrite(ctx, &pkt, End::Src, &entry.addr, entry.port.0).is_err() {
        return drop(ctx, DropReason::RewriteFailed);
    }
    stats::count(PktCounter::RevNat, ctx.len());
    TC_ACT_OK
}

#[inline(always)]
fn drop(ctx: &TcContext, reason: DropReason) -> i32 {
    stats::count_drop(reason, ctx.len());
    TC_ACT_SHOT
}
