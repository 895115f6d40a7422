//! The pod-facing TC path (the host end of each pod's veth).
//!
//! From a pod (ingress): parse (pulling only headers outside the linear part) -> count -> is
//! the destination a frontend address at all (one lookup; no: passed) -> a flow we already
//! translated keeps its backend (connection tables: answered flows, then unanswered ones) ->
//! otherwise look the destination up as a service and choose a backend, remembering the choice
//! -> rewrite the destination. No such port on a `ClusterIP`: rejected at once. A first IP
//! fragment is translated like a whole packet and remembered; a later one gets what its first
//! got (`frag.rs`).
//!
//! To a pod (egress): is the source a backend address at all (one lookup; no: passed) -> does
//! the pod (its interface) have flows translated here at all (one lookup; no: passed, the
//! usual case for pods translated at `connect()`) -> a reply from a backend gets the service
//! address back as its source (and the first reply of a flow moves it to the table of answered
//! flows; later fragments of a reply: as their first).
//!
//! Every packet that stays on its way, translated or not, continues the TCX chain
//! ([`TCX_NEXT`]): other programs on the hook, and classic tc filters behind them, see it.
//! Only a packet sent back out of the interface (hairpin, reject) or dropped ends it.

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{bpf_ktime_get_coarse_ns, bpf_redirect},
    programs::TcContext,
};
use svc_common::{
    addr::Addr,
    addrs::{AddrKey, addr_flags},
    conntrack::{CtValue, dir, flow_hash, state},
    frag::frag_flags,
    net::ipproto,
    service::scope,
    stats::{DropReason, PktCounter},
    tc_clients::{TC_CLIENTS_READY, TcClient},
};

use crate::{
    conntrack::{
        Table, ct_backend_alive, ct_create, ct_key, ct_lookup, ct_promote, ct_promote_forward,
        ct_remove_pair, ct_syn_leaves_terminating, ct_syn_opens_new, is_syn,
    },
    frag::{frag_follow, frag_remember},
    icmp,
    lb::{Choice, Chosen, lb_backend, lb_frontend_key, lb_select_for_client},
    maps::{ADDRS_V1, TC_CLIENTS_READY_V1, TC_CLIENTS_V1},
    nat::{End, nat_rewrite},
    parse::{self, tcp_flags},
    reject, stats,
};

/// `TCX_NEXT` (`TC_ACT_UNSPEC`): the packet goes on to the hook's next program (then to classic
/// tc filters, then on its way). What both programs return for every packet they let through,
/// translated or not; `TC_ACT_OK` (`TCX_PASS`) would end the chain and hide pod traffic from
/// every later program on the hook (see DESIGN.md, "Pins, restarts and take-over").
pub const TCX_NEXT: i32 = TC_ACT_UNSPEC;

/// Handles one packet from a pod. Returns the TC verdict.
#[inline(always)]
pub fn from_pod(ctx: &TcContext) -> i32 {
    let pkt = parse::parse_pulled(ctx, false);
    stats::count(pkt.l3, ctx.len());
    if let Some(l4) = pkt.l4 {
        stats::count(l4, ctx.len());
    }
    if pkt.frag == parse::frag::LATER {
        return later_fragment(ctx, &pkt, &pkt.dst, addr_flags::FRONTEND, PktCounter::Dnat);
    }
    // Only a frontend address can have flows to translate (a new one, an established one, or
    // the reply leg of a hairpinned one, addressed to the VIP and the client's port).
    if !pkt.is_tcp_or_udp() || !addr_has(&pkt.dst, pkt.family, addr_flags::FRONTEND) {
        return TCX_NEXT;
    }
    match to_service(ctx, &pkt) {
        // No such port (and no flow of ours): passed, or rejected when the address is a
        // ClusterIP.
        Outcome::NotService => reject_unlisted(ctx, &pkt),
        Outcome::Translated => {
            stats::count(PktCounter::Dnat, ctx.len());
            frag_remember(ctx, &pkt, 0);
            TCX_NEXT
        }
        // Answered beside, not inside, the translation step: both need stack room.
        Outcome::Hairpin => {
            stats::count(PktCounter::Dnat, ctx.len());
            frag_remember(ctx, &pkt, frag_flags::HAIRPIN);
            bounce(ctx)
        }
        Outcome::Drop(DropReason::NoEndpoints) => reject_or_drop(ctx, &pkt),
        Outcome::Drop(reason) => drop(ctx, reason),
        // Never from a pod (only SNAT'd external flows are forwarded by the program).
        Outcome::Forward => TCX_NEXT,
    }
}

/// What happened to a TCP/UDP packet for a service (from a pod, or from outside).
pub enum Outcome {
    /// Not addressed to a service: untouched.
    NotService,
    /// Sent to a backend (destination rewritten).
    Translated,
    /// A pod reaching itself through a service (either leg): rewritten, goes back to the pod.
    Hairpin,
    /// For a service, but dropped (or to be rejected, for `NoEndpoints`).
    Drop(DropReason),
    /// Translated, and to be sent on by the program itself (`bpf_redirect`): the node-facing
    /// path's SNAT'd packets, which the kernel's own forwarding would refuse.
    Forward,
}

/// Where a translated packet goes: backend address and port (network order); for the reply
/// leg of a hairpinned flow, the service address and port to put back as its source.
pub struct Target {
    /// The backend's address (the service address, for a hairpinned flow's reply leg).
    pub addr: Addr,
    /// The backend's port (the service port, for a hairpinned flow's reply leg).
    pub port: u16,
    /// The reply leg of a hairpinned flow.
    pub hairpin_reply: bool,
    /// The frontend's id.
    pub frontend_id: u32,
    /// The backend's id.
    pub backend_id: u32,
    /// A TCP packet that is not a SYN found no entry: chosen by a hash of its tuple.
    pub midflow_miss: bool,
    /// The packet's flow is new: its backend was chosen just now.
    pub new_flow: bool,
    /// An external flow to a remote endpoint: its source port on the node's SNAT address
    /// (network order); 0: no SNAT.
    pub snat_port: u16,
    /// The scope of the frontends the packet may be for (`svc_common::service::scope`).
    pub scope: u8,
}

impl Target {
    /// Nothing chosen yet for `pkt`, a packet to a frontend of `scope`. The address starts as
    /// the packet's own destination (copied; a zeroed array would be a `memset` call).
    #[inline(always)]
    pub const fn new(pkt: &parse::Parsed, scope: u8) -> Self {
        Self {
            addr: pkt.dst,
            port: 0,
            hairpin_reply: false,
            frontend_id: 0,
            backend_id: 0,
            midflow_miss: false,
            new_flow: false,
            snat_port: 0,
            scope,
        }
    }
}

/// The service story of one packet from a pod: conntrack -> service -> backend -> rewrite.
/// Each step is a subprogram with its own stack frame (the node-facing path calls the same
/// steps, see `world.rs`); only the target travels between them.
#[inline(never)]
fn to_service(ctx: &TcContext, pkt: &parse::Parsed) -> Outcome {
    let mut target = Target::new(pkt, scope::INTERNAL);
    // 1. A flow already translated keeps its backend, as long as the backend exists (and a SYN
    //    opening a new connection on a reused tuple chooses again).
    if !established_backend(pkt, &mut target) {
        // 2. A new flow: is it for a service? Which backend? Remember the choice, and that
        //    this pod has flows translated here (before any entry: its replies need both).
        if !mark_tc_client(ctx) {
            return Outcome::Drop(DropReason::CtInsertFailed);
        }
        match new_flow_backend(pkt, &mut target) {
            Outcome::Translated => {}
            other => return other,
        }
        if target.midflow_miss {
            stats::count(PktCounter::CtMissMidflow, ctx.len());
        }
    }
    // 3. Count it, and send it there.
    stats::count_translated(
        target.frontend_id,
        target.backend_id,
        ctx.len(),
        target.new_flow,
    );
    if target.hairpin_reply {
        // The pod answers itself through the service: backend:port -> VIP:client-port becomes
        // VIP:service-port -> pod:client-port.
        let ok = nat_rewrite(ctx, pkt, End::Dst, &pkt.src, pkt.dport).is_ok()
            && nat_rewrite(ctx, pkt, End::Src, &target.addr, target.port).is_ok();
        return if ok {
            Outcome::Hairpin
        } else {
            Outcome::Drop(DropReason::RewriteFailed)
        };
    }
    if nat_rewrite(ctx, pkt, End::Dst, &target.addr, target.port).is_err() {
        return Outcome::Drop(DropReason::RewriteFailed);
    }
    if target.addr == pkt.src {
        // Hairpin: the pod reaches itself. Its source becomes the VIP, so its own reply comes
        // back here (to the hairpin reply entry) instead of being answered locally.
        if nat_rewrite(ctx, pkt, End::Src, &pkt.dst, pkt.sport).is_err() {
            return Outcome::Drop(DropReason::RewriteFailed);
        }
        return Outcome::Hairpin;
    }
    Outcome::Translated
}

/// The backend of a tracked flow that may keep it, into `target`. Answered flows (`CT_V1`)
/// first: an entry there that may not be kept (its backend is gone, or a SYN opens a new
/// connection on its tuple) is removed with its pair, so the new flow's packets never meet
/// it. Then flows nothing answered yet (`CT_NEW_V1`: a retransmitted SYN keeps its backend).
#[inline(never)]
pub fn established_backend(pkt: &parse::Parsed, target: &mut Target) -> bool {
    let now = coarse_now();
    let fwd = ct_key(pkt, dir::FORWARD);
    let mut slot = MaybeUninit::<CtValue>::uninit();
    if ct_lookup(Table::Answered, &fwd, pkt, now, &mut slot) {
        // SAFETY: the lookup found the entry, so it wrote it.
        let e = unsafe { slot.assume_init_ref() };
        if may_keep(pkt, e) {
            set_target(target, e);
            return true;
        }
        ct_remove_pair(Table::Answered, &fwd, e);
    }
    if !ct_lookup(Table::Unanswered, &fwd, pkt, now, &mut slot) {
        return false;
    }
    // SAFETY: as above.
    let e = unsafe { slot.assume_init_ref() };
    if !may_keep(pkt, e) {
        return false;
    }
    if e.state & state::HAIRPIN_REPLY != 0 && pkt.tcp_flags & tcp_flags::RST == 0 {
        // The pod answers itself through the service: its flow is answered.
        ct_promote(&fwd, e);
    } else if target.scope == scope::EXTERNAL && !is_syn(pkt) && pkt.tcp_flags & tcp_flags::RST == 0
    {
        // From outside, the client's own second packet (its ACK of the SYN-ACK, its next
        // datagram) answers the flow: a backend's SYN-ACK to a spoofed source proves nothing.
        ct_promote_forward(&fwd, e);
    }
    set_target(target, e);
    true
}

/// Whether the packet may go where entry `e` (matched by its forward key) says: the backend
/// still exists, and the packet is not a SYN opening a new connection on the tuple (the old
/// connection ended, or its backend is terminating).
#[inline(always)]
fn may_keep(pkt: &parse::Parsed, e: &CtValue) -> bool {
    let backend = lb_backend(e.backend_id);
    if e.state & state::HAIRPIN_REPLY != 0 {
        return backend.is_some();
    }
    ct_backend_alive(e, backend)
        && !ct_syn_opens_new(pkt, e)
        && !backend.is_some_and(|b| ct_syn_leaves_terminating(pkt, &b))
}

#[inline(always)]
fn set_target(target: &mut Target, e: &CtValue) {
    target.hairpin_reply = e.state & state::HAIRPIN_REPLY != 0;
    target.addr = e.addr;
    target.port = e.port.0;
    target.frontend_id = e.frontend_id;
    target.backend_id = e.backend_id;
    target.snat_port = e.snat_port.0;
}

/// Chooses a backend for a new flow to a frontend of `target.scope` and records the flow;
/// `Translated` means `target` holds the backend. A TCP packet that is not a SYN belongs to a
/// connection whose entry was lost (evicted, expired, its backend gone): it chooses by a hash
/// of its tuple, not at random, so with an unchanged set of backends it lands where its
/// connection was.
#[inline(never)]
pub fn new_flow_backend(pkt: &parse::Parsed, target: &mut Target) -> Outcome {
    let now = coarse_now();
    let mut chosen = Chosen {
        client_port: pkt.sport,
        ..Chosen::default()
    };
    let midflow = pkt.proto == ipproto::TCP && !is_syn(pkt);
    // External flows choose by their tuple too (Maglev: the same choice on every node and
    // after a lost entry); pod flows at random.
    if midflow {
        chosen.tuple_hash = Some(flow_hash(&ct_key(pkt, dir::FORWARD)));
    }
    let mut key = lb_frontend_key(pkt);
    key.scope = target.scope;
    match lb_select_for_client(&mut key, &pkt.src, pkt.family, now, &mut chosen) {
        Choice::NotService => Outcome::NotService,
        Choice::Drop(reason) => Outcome::Drop(reason),
        Choice::Backend => {
            target.midflow_miss = midflow;
            target.new_flow = true;
            if let Err(reason) = ct_create(pkt, &chosen, now) {
                return Outcome::Drop(reason);
            }
            target.addr = chosen.backend.addr;
            target.port = chosen.backend.port.0;
            target.frontend_id = chosen.frontend_id;
            target.backend_id = chosen.backend_id;
            Outcome::Translated
        }
    }
}

/// `CLOCK_MONOTONIC` at the last tick, in ns: timeouts are seconds, so the coarse clock is
/// enough and cheaper than reading the clock source. Each step reads it itself rather than
/// taking it from its caller: a value carried across the steps costs every frame above them
/// stack, and the deepest chain is at the verifier's limit.
#[inline(always)]
pub fn coarse_now() -> u64 {
    // SAFETY: the helper has no preconditions.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Handles one packet to a pod. Returns the TC verdict.
#[inline(always)]
pub fn to_pod(ctx: &TcContext) -> i32 {
    let pkt = parse::parse_pulled(ctx, true);
    if pkt.frag == parse::frag::LATER {
        return later_fragment(ctx, &pkt, &pkt.src, addr_flags::BACKEND, PktCounter::RevNat);
    }
    if matches!(pkt.l4, Some(PktCounter::Icmp | PktCounter::Icmpv6)) {
        // An ICMP error about a translated flow: its quote must name the VIP again.
        return match icmp::icmp_error_to_pod(ctx, &pkt) {
            Ok(Some((frontend_id, backend_id))) => {
                stats::count(PktCounter::RevNat, ctx.len());
                stats::count_translated(frontend_id, backend_id, ctx.len(), false);
                TCX_NEXT
            }
            Ok(None) => TCX_NEXT,
            Err(()) => drop(ctx, DropReason::RewriteFailed),
        };
    }
    // Only a backend address can send replies to translate, and only to a pod with flows
    // translated here (pods translated at `connect()` talk to the backend itself).
    if !pkt.is_tcp_or_udp()
        || !addr_has(&pkt.src, pkt.family, addr_flags::BACKEND)
        || !may_have_tc_flows(ctx)
    {
        return TCX_NEXT;
    }
    reply_to_pod(ctx, &pkt, true)
}

/// The pod-facing interface the packet is on (the host end of the pod's veth): the same one
/// for a pod's packets both ways.
#[inline(always)]
fn pod_interface(ctx: &TcContext) -> u32 {
    // SAFETY: `skb` is this program's context; a plain field read.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// Records that the pod behind the packet's interface has a flow translated here, unless it is
/// recorded already (a lookup: no write, no lock, for a pod's every flow after its first).
/// Keyed by the interface, not the source address a pod may forge. False when it could not be
/// recorded.
#[inline(always)]
fn mark_tc_client(ctx: &TcContext) -> bool {
    let key = pod_interface(ctx);
    // SAFETY: only tested for presence.
    if unsafe { TC_CLIENTS_V1.get(&key) }.is_some() {
        return true;
    }
    let value = TcClient {
        since_ns: coarse_now(),
    };
    TC_CLIENTS_V1.insert(&key, &value, 0).is_ok()
}

/// Whether the pod behind the packet's interface may have flows translated here
/// (`svc_common::tc_clients`): its interface is in `TC_CLIENTS_V1`, or the agent has not yet
/// recorded the interfaces of flows an older build tracked.
#[inline(always)]
fn may_have_tc_flows(ctx: &TcContext) -> bool {
    let key = pod_interface(ctx);
    // SAFETY: only tested for presence.
    unsafe { TC_CLIENTS_V1.get(&key) }.is_some()
        || TC_CLIENTS_READY_V1
            .get(0)
            .is_none_or(|r| r.ready != TC_CLIENTS_READY)
}

/// Whether `addr` is a frontend or backend address (`flag`), per `ADDRS_V1`.
#[inline(always)]
pub fn addr_has(addr: &Addr, family: u8, flag: u32) -> bool {
    addr_flags_of(addr, family) & flag != 0
}

/// The `ADDRS_V1` flags of `addr` (0: neither frontend nor backend).
#[inline(always)]
fn addr_flags_of(addr: &Addr, family: u8) -> u32 {
    let key = AddrKey::new(*addr, family);
    // SAFETY: the value is read at once.
    unsafe { ADDRS_V1.get(&key) }.map_or(0, |v| v.flags)
}

/// A later fragment (no ports) whose `addr` (the destination from a pod, the source to a pod)
/// has `flag`: gets the addresses its first fragment was given, counted as `counter`; a
/// hairpinned one goes back to the pod. Unknown datagrams pass untranslated, counted. A
/// subprogram of its own (its own stack frame).
#[inline(never)]
fn later_fragment(
    ctx: &TcContext,
    pkt: &parse::Parsed,
    addr: &Addr,
    flag: u32,
    counter: PktCounter,
) -> i32 {
    if !addr_has(addr, pkt.family, flag) {
        return TCX_NEXT;
    }
    match frag_follow(ctx, pkt) {
        Ok(Some(flags)) => {
            stats::count(counter, ctx.len());
            if flags & frag_flags::HAIRPIN != 0 {
                bounce(ctx)
            } else {
                TCX_NEXT
            }
        }
        Ok(None) => {
            stats::count(PktCounter::FragUntracked, ctx.len());
            TCX_NEXT
        }
        Err(()) => drop(ctx, DropReason::RewriteFailed),
    }
}

/// A reply from a backend gets the service address back as its source; on the way to a pod
/// (`promote`), the first reply of a flow (not a reset: a refused connection is no answer)
/// moves its pair to `CT_V1`. Also used on the way out of a node-facing interface (an endpoint
/// of this node answering an external client), without promoting: a SYN-ACK leaving for an
/// outside address may answer a spoofed SYN, so there the client's next packet promotes (see
/// `established_backend`). A subprogram of its own (its own stack frame, as the ICMP one has).
#[inline(never)]
pub fn reply_to_pod(ctx: &TcContext, pkt: &parse::Parsed, promote: bool) -> i32 {
    // Timeouts are seconds: the coarse clock (CLOCK_MONOTONIC at the last tick) is enough and
    // cheaper than reading the clock source. SAFETY: the helper has no preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let key = ct_key(pkt, dir::REPLY);
    let mut slot = MaybeUninit::<CtValue>::uninit();
    if !ct_lookup(Table::Answered, &key, pkt, now, &mut slot) {
        if !ct_lookup(Table::Unanswered, &key, pkt, now, &mut slot) {
            return TCX_NEXT;
        }
        if promote && pkt.tcp_flags & tcp_flags::RST == 0 {
            // SAFETY: the lookup found the entry, so it wrote it.
            ct_promote(&key, unsafe { slot.assume_init_ref() });
        }
    }
    // SAFETY: one of the lookups found the entry.
    let entry = unsafe { slot.assume_init_ref() };
    if nat_rewrite(ctx, pkt, End::Src, &entry.addr, entry.port.0).is_err() {
        return drop(ctx, DropReason::RewriteFailed);
    }
    frag_remember(ctx, pkt, 0);
    stats::count(PktCounter::RevNat, ctx.len());
    stats::count_translated(entry.frontend_id, entry.backend_id, ctx.len(), false);
    TCX_NEXT
}

/// Sends the packet back out of the interface it came in on, to the pod, with the Ethernet
/// addresses swapped (routing it would bounce it off the host's reverse-path checks).
#[inline(always)]
fn bounce(ctx: &TcContext) -> i32 {
    let Some(eth) = parse::ptr_at::<[u8; 12]>(ctx, 0) else {
        return drop(ctx, DropReason::RewriteFailed);
    };
    // SAFETY: `ptr_at` checked the 12 bytes are inside the packet.
    let macs = unsafe { *eth };
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    if ctx.store(0, &swapped, 0).is_err() {
        return drop(ctx, DropReason::RewriteFailed);
    }
    // SAFETY: ctx.skb.skb is this program's context.
    unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) };
    TC_ACT_REDIRECT
}

/// A service without endpoints: answer with a reset or port unreachable, else drop.
#[inline(always)]
pub fn reject_or_drop(ctx: &TcContext, pkt: &parse::Parsed) -> i32 {
    let len = ctx.len();
    if reject::reject(ctx, pkt).is_ok() {
        stats::count(PktCounter::Rejected, len);
        TC_ACT_REDIRECT
    } else {
        drop(ctx, DropReason::NoEndpoints)
    }
}

/// A TCP/UDP packet to a frontend address on a port (and protocol) no frontend has: passed,
/// unless the address is a `ClusterIP`, whose unlisted ports are answered at once with a reset
/// or port unreachable, as kube-proxy does (dropped, counted, when that cannot be built). A
/// subprogram of its own (its own stack frame).
#[inline(never)]
fn reject_unlisted(ctx: &TcContext, pkt: &parse::Parsed) -> i32 {
    // Looked up again rather than kept from the first test: the first lookup's value would
    // take stack room across the translation steps, and this path is rare.
    if !addr_has(&pkt.dst, pkt.family, addr_flags::CLUSTER_IP) {
        return TCX_NEXT;
    }
    let len = ctx.len();
    if reject::reject(ctx, pkt).is_ok() {
        stats::count(PktCounter::Rejected, len);
        stats::count(PktCounter::UnlistedPort, len);
        TC_ACT_REDIRECT
    } else {
        drop(ctx, DropReason::UnlistedPort)
    }
}

/// Drops the packet, counted under `reason`.
#[inline(always)]
pub fn drop(ctx: &TcContext, reason: DropReason) -> i32 {
    stats::count_drop(reason, ctx.len());
    TC_ACT_SHOT
}
