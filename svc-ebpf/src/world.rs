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
    addr::FAMILY_V4,
    addrs::addr_flags,
    conntrack::{CtValue, dir},
    nat::config_index,
    ranges::{LOOKUP_BITS, SourceRangeKey, verdict},
    service::scope,
    stats::{DropReason, PktCounter},
};

use crate::{
    conntrack::{Table, ct_key, ct_lookup},
    maps::{SNAT_CONFIG_V1, SNAT_V1, SOURCE_RANGES_V1},
    nat::{End, nat_rewrite, snat_new_flow, snat_source},
    parse,
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
        Outcome::Forward => {
            stats::count(PktCounter::ExtDnat, ctx.len());
            forward_out(ctx, pkt.family)
        }
    }
}

/// The service story of one packet from outside, with the pod path's steps: conntrack ->
/// (a new flow: source ranges) -> service (external scope) -> backend -> (a new flow to another node's endpoint: an SNAT
/// port) -> rewrite the destination (and the source, when SNAT'd). A subprogram of its own.
#[inline(never)]
fn to_external_service(ctx: &TcContext, pkt: &parse::Parsed) -> Outcome {
    let mut target = Target::new(scope::EXTERNAL);
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
    // Not promoted here: the client's next packet does (see `established_backend`).
    let mut entry = CtValue::default();
    if !ct_lookup(Table::Answered, &key, pkt, now, &mut entry)
        && !ct_lookup(Table::Unanswered, &key, pkt, now, &mut entry)
    {
        return TCX_NEXT;
    }
    // The flow on that tuple must be the one that took this port: a stray packet to an older,
    // not yet collected SNAT entry of the same client and endpoint (reached through another
    // frontend since) is not this flow's reply.
    if entry.snat_port.0 != pkt.dport {
        return TCX_NEXT;
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
    // Its source is now a frontend address of this node: sent on from here (see
    // `forward_out`).
    forward_out(ctx, pkt.family)
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
/// Offset of the IPv4 TTL (the protocol follows it in the same 16-bit word).
const IPV4_TTL: usize = parse::ETH_HLEN + 8;
/// Offset of the IPv4 header checksum.
const IPV4_CHECK: usize = parse::ETH_HLEN + 10;
/// Offset of the IPv6 hop limit.
const IPV6_HOP_LIMIT: usize = parse::ETH_HLEN + 7;
/// Offset of the IPv4 source address (the destination follows).
const IPV4_SRC: usize = parse::ETH_HLEN + 12;
/// Offset of the IPv6 source address (the destination follows).
const IPV6_SRC: usize = parse::ETH_HLEN + 8;

/// Sends a translated packet on towards its (new) destination, as the kernel would forward it: the route and next hop from the kernel's FIB (`bpf_fib_lookup`),
/// the TTL (hop limit) decremented, the Ethernet addresses of the next hop, out of the route's
/// interface (`bpf_redirect`; `bpf_redirect_neigh` when the neighbour is not resolved yet).
///
/// Needed for packets whose source became one of the node's own addresses (SNAT, and the
/// replies of SNAT'd flows, whose source is the frontend again): the kernel's input path drops
/// a packet that arrives with a local source address (a "martian"). A packet with no route, or
/// whose TTL runs out, is dropped, counted `no_route`. Returns the TC verdict. A subprogram of
/// its own (the lookup's parameters take 64 bytes of stack); the addresses are read from the
/// packet as it is now.
#[inline(never)]
fn forward_out(ctx: &TcContext, family: u8) -> i32 {
    match try_forward_out(ctx, family) {
        Ok(()) => TC_ACT_REDIRECT,
        Err(reason) => drop(ctx, reason),
    }
}

#[inline(always)]
fn try_forward_out(ctx: &TcContext, family: u8) -> Result<(), DropReason> {
    let bad = |_| DropReason::RewriteFailed;
    // SAFETY: all-zero is a valid value of this plain C struct.
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    // SAFETY: ctx.skb.skb is this program's context.
    fib.ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    if family == FAMILY_V4 {
        fib.family = AF_INET;
        // Network order as in the packet, loaded as raw words.
        fib.__bindgen_anon_3.ipv4_src = ctx.load(IPV4_SRC).map_err(bad)?;
        fib.__bindgen_anon_4.ipv4_dst = ctx.load(IPV4_SRC + 4).map_err(bad)?;
    } else {
        fib.family = AF_INET6;
        fib.__bindgen_anon_3.ipv6_src = ctx.load(IPV6_SRC).map_err(bad)?;
        fib.__bindgen_anon_4.ipv6_dst = ctx.load(IPV6_SRC + 16).map_err(bad)?;
    }
    // SAFETY: the helper reads and writes `fib` only, within the size given.
    let rc = unsafe { bpf_fib_lookup(ctx.skb.skb.cast(), &raw mut fib, FIB_PARAMS_LEN, 0) };
    let resolved = rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS);
    if !resolved && rc != i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        return Err(DropReason::NoRoute);
    }
    decrement_ttl(ctx, family)?;
    if resolved {
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&fib.dmac);
        macs[6..].copy_from_slice(&fib.smac);
        ctx.store(0, &macs, 0)
            .map_err(|_| DropReason::RewriteFailed)?;
        // SAFETY: no preconditions.
        unsafe { bpf_redirect(fib.ifindex, 0) };
    } else {
        // SAFETY: no parameters: the kernel resolves the route's next hop itself.
        unsafe { bpf_redirect_neigh(fib.ifindex, core::ptr::null_mut(), 0, 0) };
    }
    Ok(())
}

/// Takes one from the packet's TTL (hop limit), as a router does; one that would reach 0 is a
/// drop (`no_route`).
#[inline(always)]
fn decrement_ttl(ctx: &TcContext, family: u8) -> Result<(), DropReason> {
    if family == FAMILY_V4 {
        let word: [u8; 2] = ctx.load(IPV4_TTL).map_err(|_| DropReason::RewriteFailed)?;
        if word[0] <= 1 {
            return Err(DropReason::NoRoute);
        }
        let new = [word[0] - 1, word[1]];
        let (old16, new16) = (u16::from_ne_bytes(word), u16::from_ne_bytes(new));
        ctx.l3_csum_replace(IPV4_CHECK, u64::from(old16), u64::from(new16), 2)
            .map_err(|_| DropReason::RewriteFailed)?;
        ctx.store(IPV4_TTL, &new, 0)
            .map_err(|_| DropReason::RewriteFailed)
    } else {
        let hops: u8 = ctx
            .load(IPV6_HOP_LIMIT)
            .map_err(|_| DropReason::RewriteFailed)?;
        if hops <= 1 {
            return Err(DropReason::NoRoute);
        }
        ctx.store(IPV6_HOP_LIMIT, &(hops - 1), 0)
            .map_err(|_| DropReason::RewriteFailed)
    }
}
