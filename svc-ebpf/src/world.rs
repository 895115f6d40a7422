//! The node-facing TC path (the node's uplinks): traffic from outside the cluster.
//!
//! From the world (ingress): parse -> count -> a reply to a flow this node SNAT'd (addressed to
//! the node's SNAT address, in the SNAT port range, with an entry in `SNAT_V1`) gets the client
//! back as its destination and the frontend back as its source, and is routed back out ->
//! otherwise, is the destination an external frontend address at all (`ADDRS_V1`, flag
//! `EXTERNAL`; no: passed) -> the pod path's service story with the external scope: a flow
//! already translated keeps its backend, a new one chooses among the frontend's slots (only
//! local endpoints under `externalTrafficPolicy: Local`; none: dropped, counted
//! `no_local_endpoint`), and a flow to an endpoint on another node gets the node's address and
//! an SNAT port as its source so the reply comes back here. No endpoint at all: rejected (TCP
//! reset / ICMP port unreachable), as kube-proxy rejects. Ports of a node address that no
//! frontend has are the node's own: passed.
//!
//! To the world (egress): a reply of an endpoint on this node to an external client (its source
//! is a backend address) gets the frontend address back as its source, as on the way to a pod.
//!
//! Every packet that stays on its way continues the TCX chain, as on the pod path.

use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, programs::TcContext};
use svc_common::{
    addrs::addr_flags,
    conntrack::{CtValue, dir},
    nat::config_index,
    service::scope,
    stats::{DropReason, PktCounter},
};

use crate::{
    conntrack::{Table, ct_key, ct_lookup, ct_promote},
    maps::{SNAT_CONFIG_V1, SNAT_V1},
    nat::{End, nat_rewrite, snat_new_flow, snat_source},
    parse::{self, tcp_flags},
    pod::{
        Outcome, TCX_NEXT, Target, addr_has, drop, established_backend, new_flow_backend,
        reject_or_drop, reply_to_pod,
    },
    stats,
};

/// Handles one packet arriving from outside. Returns the TC verdict.
#[inline(always)]
pub fn from_world(ctx: &TcContext) -> i32 {
    let pkt = parse::parse_pulled(ctx, false);
    stats::count(pkt.l3, ctx.len());
    if let Some(l4) = pkt.l4 {
        stats::count(l4, ctx.len());
    }
    // Later fragments and everything but TCP and UDP: not translated here (yet).
    if pkt.frag == parse::frag::LATER || !pkt.is_tcp_or_udp() {
        return TCX_NEXT;
    }
    if is_snat_reply(&pkt) {
        return snat_reply(ctx, &pkt);
    }
    if !addr_has(&pkt.dst, pkt.family, addr_flags::EXTERNAL) {
        return TCX_NEXT;
    }
    match to_external_service(ctx, &pkt) {
        // A node address's other ports are the node's.
        Outcome::NotService => TCX_NEXT,
        Outcome::Translated | Outcome::Hairpin => {
            stats::count(PktCounter::ExtDnat, ctx.len());
            TCX_NEXT
        }
        Outcome::Drop(DropReason::NoEndpoints) => reject_or_drop(ctx, &pkt),
        Outcome::Drop(reason) => drop(ctx, reason),
    }
}

/// The service story of one packet from outside, with the pod path's steps: conntrack ->
/// service (external scope) -> backend -> (a new flow to another node's endpoint: an SNAT
/// port) -> rewrite the destination (and the source, when SNAT'd). A subprogram of its own.
#[inline(never)]
fn to_external_service(ctx: &TcContext, pkt: &parse::Parsed) -> Outcome {
    // Timeouts are seconds: the coarse clock is enough. SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let mut target = Target::new(scope::EXTERNAL);
    if !established_backend(pkt, now, &mut target) {
        match new_flow_backend(pkt, now, &mut target) {
            Outcome::Translated => {}
            other => return other,
        }
        if target.midflow_miss {
            stats::count(PktCounter::CtMissMidflow, ctx.len());
        }
        // Recorded first, then given its SNAT port (an endpoint on another node), which both
        // entries of the pair note.
        match snat_new_flow(pkt, target.backend_id, now) {
            Ok(port) => target.snat_port = port,
            Err(reason) => return Outcome::Drop(reason),
        }
    }
    stats::count_translated(
        target.frontend_id,
        target.backend_id,
        ctx.len(),
        target.new_flow,
    );
    if nat_rewrite(ctx, pkt, End::Dst, &target.addr, target.port).is_err() {
        return Outcome::Drop(DropReason::RewriteFailed);
    }
    if target.snat_port != 0 {
        // The reply must come back through this node.
        if let Err(reason) = snat_source(ctx, pkt, target.snat_port) {
            return Outcome::Drop(reason);
        }
        stats::count(PktCounter::Snat, ctx.len());
    }
    Outcome::Translated
}

/// Handles one packet leaving towards the outside. Returns the TC verdict.
#[inline(always)]
pub fn to_world(ctx: &TcContext) -> i32 {
    let pkt = parse::parse_pulled(ctx, true);
    if pkt.frag == parse::frag::LATER || !pkt.is_tcp_or_udp() {
        return TCX_NEXT;
    }
    // Only a backend address can send replies to translate.
    if !addr_has(&pkt.src, pkt.family, addr_flags::BACKEND) {
        return TCX_NEXT;
    }
    reply_to_pod(ctx, &pkt)
}

/// Whether the packet is addressed to this node's SNAT address of its family, in the SNAT port
/// range (one array lookup).
#[inline(always)]
fn is_snat_reply(pkt: &parse::Parsed) -> bool {
    let Some(cfg) = SNAT_CONFIG_V1.get(config_index(pkt.family)) else {
        return false;
    };
    let port = u16::from_be(pkt.dport);
    cfg.enabled != 0 && cfg.addr == pkt.dst && port >= cfg.port_min && port <= cfg.port_max
}

/// A packet to the SNAT address and port range: the reply of an SNAT'd flow when `SNAT_V1`
/// knows its tuple. Its destination becomes the client again and its source the frontend (from
/// the flow's reply entry, as for any reply), and it is routed back out. A tuple `SNAT_V1` does
/// not know, or whose flow has no conntrack entry any more, is passed to the node untouched
/// (no socket has a reserved port: the node answers it with a reset). A subprogram of its own.
#[inline(never)]
fn snat_reply(ctx: &TcContext, pkt: &parse::Parsed) -> i32 {
    let mut key = ct_key(pkt, dir::REPLY);
    let Some(nat) = SNAT_V1.get_ptr_mut(&key) else {
        return TCX_NEXT;
    };
    // Timeouts are seconds: the coarse clock is enough. SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: a pointer into the map's value; a racing update only loses a refresh.
    let client_port = unsafe {
        (*nat).last_seen_ns = now;
        key.dst = (*nat).client;
        (*nat).client_port
    };
    // The reply as the endpoint would have sent it without SNAT (endpoint -> client): the
    // flow's reply entry. (The lookups read only the packet's protocol and flags.)
    key.dport = client_port;
    let mut entry = CtValue::default();
    if !ct_lookup(Table::Answered, &key, pkt, now, &mut entry) {
        if !ct_lookup(Table::Unanswered, &key, pkt, now, &mut entry) {
            return TCX_NEXT;
        }
        if pkt.tcp_flags & tcp_flags::RST == 0 {
            ct_promote(&key, &entry);
        }
    }
    // The source is untouched by the first rewrite, so `pkt` still names it for the second.
    if nat_rewrite(ctx, pkt, End::Dst, &key.dst, client_port.0).is_err()
        || nat_rewrite(ctx, pkt, End::Src, &entry.addr, entry.port.0).is_err()
    {
        return drop(ctx, DropReason::RewriteFailed);
    }
    stats::count(PktCounter::RevSnat, ctx.len());
    stats::count(PktCounter::RevNat, ctx.len());
    stats::count_translated(entry.frontend_id, entry.backend_id, ctx.len(), false);
    TCX_NEXT
}
