//! The node-facing TC path (the node's uplinks): traffic from outside the cluster.
//!
//! From the world (ingress): parse -> count -> a reply to a flow this node SNAT'd (addressed to
//! the node's SNAT address, in the SNAT port range, with an entry in `SNAT_V1`) gets the client
//! back as its destination and the frontend back as its source, and is routed back out ->
//! otherwise, is the destination an external frontend address at all (`ADDRS_V1`, flag
//! `EXTERNAL`; no: passed) -> the pod path's service story with the external scope: a flow
//! already translated keeps its backend; a new one must come from a client in the frontend's
//! `loadBalancerSourceRanges` when it has some (`SOURCE_RANGES_V1`; else dropped, counted
//! `source_range`), then chooses among the frontend's slots (only
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
//!
//! The decision ([`decide`]) is shared with the XDP program of the same interface (`xdp.rs`),
//! through [`Frame`]: with XDP on, a packet XDP translated for this node, or translated and
//! could not send on, arrives here with its decision in its metadata (`svc_common::handoff`)
//! and is only let through or sent on; any other packet XDP passed is untouched, and decided
//! here exactly as with XDP off.

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_REDIRECT, bpf_fib_lookup,
    },
    helpers::{bpf_fib_lookup, bpf_ktime_get_coarse_ns, bpf_redirect, bpf_redirect_neigh},
    maps::lpm_trie::Key,
    programs::TcContext,
};
use svc_common::{
    Be16,
    addr::{FAMILY_V4, FAMILY_V6},
    addrs::addr_flags,
    conntrack::{CtValue, dir},
    csum, handoff,
    nat::config_index,
    ranges::{LOOKUP_BITS, SourceRangeKey, verdict},
    service::scope,
    stats::{DropReason, PktCounter},
};

use crate::{
    conntrack::{Table, ct_key, ct_lookup},
    frame::{Frame, ptr_at},
    maps::{SNAT_CONFIG_V1, SNAT_V1, SOURCE_RANGES_V1},
    nat::{End, nat_rewrite, snat_new_flow, snat_source},
    parse,
    pod::{
        Outcome, TCX_NEXT, Target, addr_has, drop, established_backend, new_flow_backend,
        reject_or_drop, reply_to_pod,
    },
    stats,
};

/// What the node-facing path decided for a TCP/UDP packet from outside.
pub enum Decision {
    /// Not for an external frontend, and no reply of a flow this node SNAT'd: untouched.
    Untouched,
    /// For a frontend without endpoints: to be rejected (TCP reset, ICMP port unreachable),
    /// which only the TC program builds. Untouched so far.
    Reject,
    /// Translated for an endpoint of this node: the kernel routes it there.
    Delivered,
    /// Translated, and to be sent on by the program itself (its source is now one of the
    /// node's addresses, which the kernel's input path refuses): see [`forward_route`].
    Forward,
    /// Dropped, for this reason (not counted yet).
    Drop(DropReason),
}

/// Decides one packet from outside, translating it (but not sending it on, and not counting
/// its parse counters or a drop): the steps both node-facing programs share.
#[inline(always)]
pub fn decide<C: Frame>(ctx: &C, pkt: &parse::Parsed) -> Decision {
    // Later fragments and everything but TCP and UDP: not translated here (yet).
    if pkt.frag == parse::frag::LATER || !pkt.is_tcp_or_udp() {
        return Decision::Untouched;
    }
    if is_snat_reply(pkt) {
        return snat_reply(ctx, pkt);
    }
    if !addr_has(&pkt.dst, pkt.family, addr_flags::EXTERNAL) {
        return Decision::Untouched;
    }
    match to_external_service(ctx, pkt) {
        // A node address's other ports are the node's.
        Outcome::NotService => Decision::Untouched,
        Outcome::Translated | Outcome::Hairpin => {
            stats::count(PktCounter::ExtDnat, ctx.len());
            Decision::Delivered
        }
        Outcome::Drop(DropReason::NoEndpoints) => Decision::Reject,
        Outcome::Drop(reason) => Decision::Drop(reason),
        Outcome::Forward => {
            stats::count(PktCounter::ExtDnat, ctx.len());
            Decision::Forward
        }
    }
}

/// Handles one packet arriving from outside. Returns the TC verdict.
#[inline(always)]
pub fn from_world(ctx: &TcContext) -> i32 {
    // Decided by the XDP program already: acted on, not decided again (XDP counted it).
    match xdp_decision(ctx) {
        handoff::DELIVERED => return TCX_NEXT,
        handoff::FORWARD_V4 => return forward_out(ctx, FAMILY_V4),
        handoff::FORWARD_V6 => return forward_out(ctx, FAMILY_V6),
        _ => {}
    }
    let pkt = parse::parse_pulled(ctx, false);
    stats::count(pkt.l3, ctx.len());
    if let Some(l4) = pkt.l4 {
        stats::count(l4, ctx.len());
    }
    match decide(ctx, &pkt) {
        Decision::Untouched | Decision::Delivered => TCX_NEXT,
        Decision::Reject => reject_or_drop(ctx, &pkt),
        Decision::Drop(reason) => drop(ctx, reason),
        Decision::Forward => forward_out(ctx, pkt.family),
    }
}

/// The decision word the XDP program left in the packet's metadata (`svc_common::handoff`),
/// or 0 when there is none of ours.
#[inline(always)]
fn xdp_decision(ctx: &TcContext) -> u32 {
    // SAFETY: `skb` is this program's context.
    let meta = unsafe { (*ctx.skb.skb).data_meta } as usize;
    if meta + handoff::META_LEN > ctx.data() {
        return 0;
    }
    // SAFETY: the 4 bytes before the frame are the metadata, checked above.
    let word = unsafe { (meta as *const u32).read_unaligned() };
    if word & 0xffff_ff00 == handoff::MAGIC {
        word
    } else {
        0
    }
}

/// The service story of one packet from outside, with the pod path's steps: conntrack ->
/// (a new flow: source ranges) -> service (external scope) -> backend -> (a new flow to another node's endpoint: an SNAT
/// port) -> rewrite the destination (and the source, when SNAT'd). A subprogram of its own.
#[inline(never)]
fn to_external_service<C: Frame>(ctx: &C, pkt: &parse::Parsed) -> Outcome {
    let mut target = Target::new(pkt, scope::EXTERNAL);
    if !established_backend(pkt, &mut target) {
        // A new flow: its client must be in the frontend's `loadBalancerSourceRanges`, if it
        // has some, before a backend is chosen (flows already translated keep going).
        if !source_allowed(pkt) {
            return Outcome::Drop(DropReason::SourceRange);
        }
        match new_flow_backend(pkt, &mut target) {
            Outcome::Translated => {}
            other => return other,
        }
        if target.midflow_miss {
            stats::count_apart(PktCounter::CtMissMidflow, ctx.len());
        }
        // Recorded first, then given its SNAT port (an endpoint on another node), which both
        // entries of the pair note.
        if let Some(reason) = snat_new_flow(pkt, target.backend_id, &mut target.snat_port) {
            return Outcome::Drop(reason);
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
    if target.snat_port == 0 {
        // To an endpoint of this node: the kernel routes it there.
        return Outcome::Translated;
    }
    // The reply must come back through this node; the packet now has one of the node's
    // addresses as its source, which the kernel refuses on input: sent on from here.
    if let Some(reason) = snat_source(ctx, pkt, target.snat_port) {
        return Outcome::Drop(reason);
    }
    stats::count_apart(PktCounter::Snat, ctx.len());
    Outcome::Forward
}

/// Whether the packet's client may open a new flow to its destination (`SOURCE_RANGES_V1`, one
/// longest-prefix lookup of the frontend and the client's full address): yes when the longest
/// match says `ALLOW` (the client is in one of the frontend's ranges) or nothing matches (the
/// frontend has no ranges, or is no frontend at all); no when it says `DENY`. A leaf subprogram
/// of its own: its 40-byte key lives in its own frame, never beside the new-flow steps' on the
/// deepest call chain (`to_external_service`, `new_flow_backend`, `ct_create`), which is at the
/// verifier's stack limit.
#[inline(never)]
fn source_allowed(pkt: &parse::Parsed) -> bool {
    let key = Key::new(
        LOOKUP_BITS,
        SourceRangeKey {
            frontend: pkt.dst,
            port: Be16(pkt.dport),
            proto: pkt.proto,
            family: pkt.family,
            client: pkt.src,
        },
    );
    SOURCE_RANGES_V1
        .get(&key)
        .is_none_or(|v| v.verdict == verdict::ALLOW)
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
    reply_to_pod(ctx, &pkt, false)
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
fn snat_reply<C: Frame>(ctx: &C, pkt: &parse::Parsed) -> Decision {
    let mut key = ct_key(pkt, dir::REPLY);
    let Some(nat) = SNAT_V1.get_ptr_mut(&key) else {
        return Decision::Untouched;
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
    // Not promoted here: the client's next packet does (see `established_backend`).
    let mut slot = MaybeUninit::<CtValue>::uninit();
    if !ct_lookup(Table::Answered, &key, pkt, now, &mut slot)
        && !ct_lookup(Table::Unanswered, &key, pkt, now, &mut slot)
    {
        return Decision::Untouched;
    }
    // SAFETY: one of the lookups found the entry, so it wrote it.
    let entry = unsafe { slot.assume_init_ref() };
    // The flow on that tuple must be the one that took this port: a stray packet to an older,
    // not yet collected SNAT entry of the same client and endpoint (reached through another
    // frontend since) is not this flow's reply.
    if entry.snat_port.0 != pkt.dport {
        return Decision::Untouched;
    }
    // The source is untouched by the first rewrite, so `pkt` still names it for the second.
    if nat_rewrite(ctx, pkt, End::Dst, &key.dst, client_port.0).is_err()
        || nat_rewrite(ctx, pkt, End::Src, &entry.addr, entry.port.0).is_err()
    {
        return Decision::Drop(DropReason::RewriteFailed);
    }
    stats::count(PktCounter::RevSnat, ctx.len());
    stats::count(PktCounter::RevNat, ctx.len());
    stats::count_translated(entry.frontend_id, entry.backend_id, ctx.len(), false);
    // Its source is now a frontend address of this node: sent on from here (see
    // `forward_route`).
    Decision::Forward
}

/// `AF_INET` (uapi).
const AF_INET: u8 = 2;
/// `AF_INET6` (uapi).
const AF_INET6: u8 = 10;
/// Size of the FIB lookup's parameters (64 bytes), as the helper takes it.
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    reason = "64 fits an i32"
)]
const FIB_PARAMS_LEN: i32 = core::mem::size_of::<bpf_fib_lookup>() as i32;
/// Offset of the IPv4 TTL (the protocol follows it in the same 16-bit word, then the header
/// checksum).
const IPV4_TTL: usize = parse::ETH_HLEN + 8;
/// Offset of the IPv6 hop limit.
const IPV6_HOP_LIMIT: usize = parse::ETH_HLEN + 7;
/// Offset of the IPv4 source address (the destination follows).
const IPV4_SRC: usize = parse::ETH_HLEN + 12;
/// Offset of the IPv6 source address (the destination follows).
const IPV6_SRC: usize = parse::ETH_HLEN + 8;

/// Where a translated packet goes next, as the kernel's FIB says ([`forward_route`]).
pub enum Route {
    /// Out of this interface, the next hop's Ethernet addresses written and the TTL (hop
    /// limit) decremented: ready to send.
    Resolved(u32),
    /// Out of this interface, whose neighbour entry for the next hop is not resolved yet:
    /// untouched so far (only TC's `bpf_redirect_neigh` can resolve it).
    Unresolved(u32),
}

/// Routes a translated packet as the kernel would forward it: the route and next hop from the
/// kernel's FIB (`bpf_fib_lookup`), and when the next hop is resolved, its Ethernet addresses
/// and the TTL (hop limit) decremented. A packet with no route, or whose TTL runs out, is a
/// drop (`no_route`).
///
/// Needed for packets whose source became one of the node's own addresses (SNAT, and the
/// replies of SNAT'd flows, whose source is the frontend again): the kernel's input path drops
/// a packet that arrives with a local source address (a "martian"). A subprogram of its own
/// (the lookup's parameters take 64 bytes of stack); the addresses are read from the packet as
/// it is now.
#[inline(never)]
pub fn forward_route<C: Frame>(ctx: &C, family: u8) -> Result<Route, DropReason> {
    // SAFETY: all-zero is a valid value of this plain C struct.
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    fib.ifindex = ctx.ingress_ifindex();
    // Network order as in the packet, read as raw words.
    if family == FAMILY_V4 {
        fib.family = AF_INET;
        let addrs = ptr_at::<[u32; 2]>(ctx, IPV4_SRC).ok_or(DropReason::RewriteFailed)?;
        // SAFETY: `ptr_at` checked the bytes are inside the packet; read unaligned.
        let [src, dst] = unsafe { addrs.read_unaligned() };
        fib.__bindgen_anon_3.ipv4_src = src;
        fib.__bindgen_anon_4.ipv4_dst = dst;
    } else {
        fib.family = AF_INET6;
        let addrs = ptr_at::<[[u32; 4]; 2]>(ctx, IPV6_SRC).ok_or(DropReason::RewriteFailed)?;
        // SAFETY: as above.
        let [src, dst] = unsafe { addrs.read_unaligned() };
        fib.__bindgen_anon_3.ipv6_src = src;
        fib.__bindgen_anon_4.ipv6_dst = dst;
    }
    // SAFETY: the helper reads and writes `fib` only, within the size given.
    let rc = unsafe { bpf_fib_lookup(ctx.raw(), &raw mut fib, FIB_PARAMS_LEN, 0) };
    if rc == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        return Ok(Route::Unresolved(fib.ifindex));
    }
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        return Err(DropReason::NoRoute);
    }
    decrement_ttl(ctx, family)?;
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&fib.dmac);
    macs[6..].copy_from_slice(&fib.smac);
    ctx.store(0, &macs)
        .map_err(|()| DropReason::RewriteFailed)?;
    Ok(Route::Resolved(fib.ifindex))
}

/// Sends a translated packet on (see [`forward_route`]): `bpf_redirect` to a resolved next
/// hop, `bpf_redirect_neigh` (TTL decremented here) when the neighbour is not resolved yet.
/// Returns the TC verdict.
#[inline(never)]
fn forward_out(ctx: &TcContext, family: u8) -> i32 {
    match forward_route(ctx, family) {
        Ok(Route::Resolved(ifindex)) => {
            // SAFETY: no preconditions.
            unsafe { bpf_redirect(ifindex, 0) };
            TC_ACT_REDIRECT
        }
        Ok(Route::Unresolved(ifindex)) => {
            if let Err(reason) = decrement_ttl(ctx, family) {
                return drop(ctx, reason);
            }
            // SAFETY: no parameters: the kernel resolves the route's next hop itself.
            unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) };
            TC_ACT_REDIRECT
        }
        Err(reason) => drop(ctx, reason),
    }
}

/// Takes one from the packet's TTL (hop limit), as a router does; one that would reach 0 is a
/// drop (`no_route`).
#[inline(always)]
fn decrement_ttl<C: Frame>(ctx: &C, family: u8) -> Result<(), DropReason> {
    if family == FAMILY_V4 {
        let hdr = ptr_at::<[u8; 4]>(ctx, IPV4_TTL).ok_or(DropReason::RewriteFailed)?;
        // SAFETY: `ptr_at` checked TTL, protocol and checksum are inside the packet.
        let [ttl, proto, c0, c1] = unsafe { hdr.read_unaligned() };
        if ttl <= 1 {
            return Err(DropReason::NoRoute);
        }
        let old = u16::from_ne_bytes([ttl, proto]);
        let new = u16::from_ne_bytes([ttl - 1, proto]);
        let check = csum::replace16(u16::from_ne_bytes([c0, c1]), old, new).to_ne_bytes();
        ctx.store(IPV4_TTL, &[ttl - 1, proto, check[0], check[1]])
            .map_err(|()| DropReason::RewriteFailed)
    } else {
        let hops = ptr_at::<u8>(ctx, IPV6_HOP_LIMIT).ok_or(DropReason::RewriteFailed)?;
        // SAFETY: `ptr_at` checked the byte is inside the packet.
        let hops = unsafe { *hops };
        if hops <= 1 {
            return Err(DropReason::NoRoute);
        }
        ctx.store(IPV6_HOP_LIMIT, &(hops - 1))
            .map_err(|()| DropReason::RewriteFailed)
    }
}
