//! Address and port rewriting with checksum fix-ups by the kernel's own helpers (on an XDP
//! frame, by the same arithmetic: see `frame`).
//!
//! The helpers are the right tool here, not hand-rolled arithmetic: packets a pod's stack
//! sends over veth are usually `CHECKSUM_PARTIAL` (the L4 field holds only the pseudo-header
//! sum), and `bpf_l4_csum_replace` with `BPF_F_PSEUDO_HDR` treats PARTIAL, COMPLETE and plain
//! packets alike correctly; `BPF_F_MARK_MANGLED_0` keeps a UDP "no checksum" zero as zero.

use aya_ebpf::{bindings::BPF_NOEXIST, programs::TcContext};
use svc_common::{
    Be16,
    addr::{Addr, FAMILY_V4},
    conntrack::{CtKey, addr_eq, dir, flow_hash},
    csum,
    nat::{PORT_TRIES, SnatValue, candidate_port, config_index},
    net::ipproto,
    service::backend_flags,
    stats::DropReason,
};

use crate::{
    frame::{BPF_F_MARK_MANGLED_0, Frame},
    maps::{BACKENDS_V1, CT_NEW_V1, SNAT_CONFIG_V1, SNAT_V1},
    parse::{ETH_HLEN, Parsed, ptr_at},
};

/// `EEXIST` (errno), as map updates return it negated.
const EEXIST: i32 = 17;

/// Gives the new external flow `pkt`, just recorded in `CT_NEW_V1` and sent to the backend
/// `backend_id`, an SNAT port when that endpoint runs on another node (else returns 0: no
/// SNAT): the first free one of [`PORT_TRIES`] candidates of the range, from a point chosen by
/// a hash of the flow's tuple, taken by inserting its reply key into `SNAT_V1` only if absent
/// (or kept, when the entry there already names the flow's client and port: a flow that lost
/// its conntrack entries, see [`names_client`]). Both conntrack entries of the flow note the
/// port, and so does `port_out` (network order; left alone without SNAT). When no port can be
/// had, the flow's pair is removed again and the reason returned. A subprogram of its own; one
/// key on its stack, reused. (It writes the port through `port_out` rather than returning a
/// `Result`, which would be returned through the caller's stack, on the path whose frames are
/// at the verifier's limit.)
#[inline(never)]
pub fn snat_new_flow(pkt: &Parsed, backend_id: u32, port_out: &mut u16) -> Option<DropReason> {
    let now = crate::pod::coarse_now();
    // SAFETY: copied out at once.
    let backend = match unsafe { BACKENDS_V1.get(&backend_id) } {
        Some(b) if b.flags & backend_flags::LOCAL == 0 => (b.addr, b.port),
        _ => return None,
    };
    let (addr, port) = (&backend.0, backend.1.0);
    // The flow's forward key, then its reply key (endpoint -> client), then SNAT keys.
    let mut key = CtKey {
        src: pkt.src,
        dst: pkt.dst,
        sport: Be16(pkt.sport),
        dport: Be16(pkt.dport),
        proto: pkt.proto,
        family: pkt.family,
        dir: dir::FORWARD,
        _pad: 0,
    };
    let taken = take_port(&mut key, pkt, addr, port, now);
    // Back to the forward key, then the reply key: note the port, or forget the flow.
    key.src = pkt.src;
    key.dst = pkt.dst;
    key.sport = Be16(pkt.sport);
    key.dport = Be16(pkt.dport);
    key.dir = dir::FORWARD;
    note_port(&key, taken);
    key.src = *addr;
    key.sport = Be16(port);
    key.dst = pkt.src;
    key.dport = Be16(pkt.sport);
    key.dir = dir::REPLY;
    note_port(&key, taken);
    match taken {
        Ok(port) => {
            *port_out = port;
            None
        }
        Err(reason) => Some(reason),
    }
}

/// Sets the SNAT port of the `CT_NEW_V1` entry `key`, or removes the entry when there is none.
#[inline(always)]
fn note_port(key: &CtKey, taken: Result<u16, DropReason>) {
    match taken {
        Ok(snat_port) => {
            if let Some(entry) = CT_NEW_V1.get_ptr_mut(key) {
                // SAFETY: a pointer into the map's value.
                unsafe { (*entry).snat_port = Be16(snat_port) };
            }
        }
        Err(_) => {
            let _ = CT_NEW_V1.remove(key);
        }
    }
}

/// The tuple hash new flows take SNAT ports by: [`flow_hash`] of the flow's forward key. A
/// subprogram of its own: the hash's words would otherwise take the caller's stack.
#[inline(never)]
fn snat_hash(key: &CtKey) -> u32 {
    flow_hash(key)
}

/// The port-taking part of [`snat_new_flow`]; `key` holds the flow's forward key on entry and
/// is left as an SNAT key.
#[inline(always)]
fn take_port(
    key: &mut CtKey,
    pkt: &Parsed,
    addr: &Addr,
    port: u16,
    now: u64,
) -> Result<u16, DropReason> {
    let Some(cfg) = SNAT_CONFIG_V1.get(config_index(pkt.family)) else {
        return Err(DropReason::NatNoAddress);
    };
    if cfg.enabled == 0 {
        return Err(DropReason::NatNoAddress);
    }
    let hash = snat_hash(key);
    key.src = *addr;
    key.dst = cfg.addr;
    key.sport = Be16(port);
    key.dir = dir::REPLY;
    let value = SnatValue {
        client: pkt.src,
        client_port: Be16(pkt.sport),
        _pad: 0,
        last_seen_ns: now,
    };
    let mut n = 0;
    while n < PORT_TRIES {
        let candidate = candidate_port(hash, n, cfg.port_min, cfg.port_max).to_be();
        key.dport = Be16(candidate);
        match SNAT_V1.insert(&*key, &value, u64::from(BPF_NOEXIST)) {
            Ok(()) => return Ok(candidate),
            Err(e) if e == -EEXIST => {
                if names_client(key, pkt, now) {
                    return Ok(candidate);
                }
            }
            Err(_) => return Err(DropReason::NatTableFull),
        }
        n += 1;
    }
    Err(DropReason::NatPortsExhausted)
}

/// Whether the taken `SNAT_V1` entry `key` names the packet's client and port: the port of
/// this very flow, whose conntrack entries were lost (evicted, expired) while its `SNAT_V1`
/// entry stayed (the agent removes it only on its next sweep). The flow keeps it (the entry is
/// refreshed): a new port would show the endpoint a new connection, which it resets. No other
/// live flow can own it: the key fixes the endpoint, so its replies map to the reply entry
/// (endpoint -> client and port) that [`crate::conntrack::ct_create`] just made this flow's own.
/// A subprogram of its own: inlined, it would grow the frame of [`snat_new_flow`] past the
/// verifier's 512 bytes for the whole call chain.
#[inline(never)]
fn names_client(key: &CtKey, pkt: &Parsed, now: u64) -> bool {
    let Some(entry) = SNAT_V1.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: a pointer into the map's value; a racing update only loses a refresh.
    unsafe {
        if !addr_eq(&(*entry).client, &pkt.src) || (*entry).client_port.0 != pkt.sport {
            return false;
        }
        (*entry).last_seen_ns = now;
    }
    true
}

/// Rewrites the source of an external flow's packet (already sent to its remote endpoint) to
/// the node's SNAT address and `port` (network order); `Some` says why it could not. (An
/// `Option` comes back in a register; a `Result` would through the caller's stack.)
#[inline(never)]
pub fn snat_source<C: Frame>(ctx: &C, pkt: &Parsed, port: u16) -> Option<DropReason> {
    let Some(cfg) = SNAT_CONFIG_V1.get(config_index(pkt.family)).copied() else {
        return Some(DropReason::NatNoAddress);
    };
    nat_rewrite(ctx, pkt, End::Src, &cfg.addr, port)
        .err()
        .map(|()| DropReason::RewriteFailed)
}

/// `BPF_F_PSEUDO_HDR` (uapi): the changed field is part of the pseudo header.
const BPF_F_PSEUDO_HDR: u64 = 1 << 4;

/// Which end of the packet to rewrite.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The source address and port.
    Src,
    /// The destination address and port.
    Dst,
}

/// Rewrites the address and port (`port` network order) of `end` and fixes every checksum.
/// A subprogram of its own (its own stack frame).
///
/// The transport checksum first, by the helpers: they know whether the packet is
/// `CHECKSUM_PARTIAL`, which decides whether the port change goes into the field. Then the
/// bytes, with as few stores as the layout allows (each helper call costs): the IPv4 header
/// checksum is plain arithmetic, written with the address; when the port changes and the
/// transport header follows the IP header directly (no IPv4 options, no IPv6 extension
/// headers: nearly every packet), the port goes in the same store (IPv4: checksum, addresses
/// and ports are 14 contiguous bytes; IPv6: destination and ports 20, source to ports 36).
/// The transport checksum, at byte 6 or 16 of its header, is outside every stored range. The
/// `IPv6` address difference is summed here instead of by `bpf_csum_diff`.
#[inline(never)]
pub fn nat_rewrite<C: Frame>(
    ctx: &C,
    pkt: &Parsed,
    end: End,
    addr: &Addr,
    port: u16,
) -> Result<(), ()> {
    let (check_off, mangled) = if pkt.proto == ipproto::TCP {
        (pkt.l4_off + 16, 0)
    } else {
        (pkt.l4_off + 6, BPF_F_MARK_MANGLED_0)
    };
    let (old_addr, old_port) = match end {
        End::Src => (&pkt.src, pkt.sport),
        End::Dst => (&pkt.dst, pkt.dport),
    };
    let v4 = pkt.family == FAMILY_V4;
    let (old4, new4) = (word(old_addr), word(addr));
    if v4 {
        ctx.l4_csum_replace(
            check_off,
            u64::from(old4),
            u64::from(new4),
            BPF_F_PSEUDO_HDR | mangled | 4,
        )?;
    } else {
        let diff = csum_diff128(&words(old_addr), &words(addr));
        ctx.l4_csum_replace(check_off, 0, u64::from(diff), BPF_F_PSEUDO_HDR | mangled)?;
    }
    let port_changes = port != old_port;
    if port_changes {
        ctx.l4_csum_replace(check_off, u64::from(old_port), u64::from(port), mangled | 2)?;
    }
    let src = end == End::Src;
    let ports_follow = port_changes && pkt.l4_off == if v4 { IPV4_PORTS } else { IPV6_PORTS };
    match (v4, ports_follow, src) {
        (true, true, _) => return store_v4::<C, 14>(ctx, src, old4, new4, port),
        (true, false, _) => store_v4::<C, 10>(ctx, src, old4, new4, port)?,
        (false, true, false) => return store_v6::<C, 20>(ctx, false, addr, port),
        (false, true, true) => return store_v6::<C, 36>(ctx, true, addr, port),
        (false, false, _) => ctx.store(ETH_HLEN + if src { 8 } else { 24 }, addr)?,
    }
    if port_changes {
        ctx.store(pkt.l4_off + if src { 0 } else { 2 }, &port)?;
    }
    Ok(())
}

/// Offset of the IPv4 header checksum.
const IPV4_CHECK: usize = ETH_HLEN + 10;
/// Offset of the transport header after an IPv4 header without options.
const IPV4_PORTS: usize = ETH_HLEN + 20;
/// Offset of the transport header after an IPv6 header without extension headers.
const IPV6_PORTS: usize = ETH_HLEN + 40;

/// Writes the IPv4 header checksum (updated for the address change `old` -> `new`) and the new
/// address (the source with `src`, else the destination) with one store of the `N` bytes from
/// the header checksum on: 10 (checksum and addresses) or 14 (the ports too, which must follow
/// the header: the port of the same end is `port`).
#[inline(always)]
fn store_v4<C: Frame, const N: usize>(
    ctx: &C,
    src: bool,
    old: u32,
    new: u32,
    port: u16,
) -> Result<(), ()> {
    let bytes = ptr_at::<[u8; N]>(ctx, IPV4_CHECK).ok_or(())?;
    // SAFETY: `ptr_at` checked the bytes are inside the packet.
    let mut bytes = unsafe { *bytes };
    let check = csum::replace32(u16::from_ne_bytes([bytes[0], bytes[1]]), old, new);
    bytes[..2].copy_from_slice(&check.to_ne_bytes());
    let at = if src { 2 } else { 6 };
    bytes[at..at + 4].copy_from_slice(&new.to_ne_bytes());
    if N == 14 {
        let at = if src { 10 } else { 12 };
        bytes[at..at + 2].copy_from_slice(&port.to_ne_bytes());
    }
    ctx.store(IPV4_CHECK, &bytes)
}

/// Writes an IPv6 address (the source with `src`, else the destination) and the port of the
/// same end with one store of the `N` bytes from the address on: the destination and the
/// ports (20), or the source, the destination as it is, and the ports (36). The ports must
/// follow the fixed header.
#[inline(always)]
fn store_v6<C: Frame, const N: usize>(
    ctx: &C,
    src: bool,
    addr: &Addr,
    port: u16,
) -> Result<(), ()> {
    let at = ETH_HLEN + if src { 8 } else { 24 };
    let bytes = ptr_at::<[u8; N]>(ctx, at).ok_or(())?;
    // SAFETY: `ptr_at` checked the bytes are inside the packet.
    let mut bytes = unsafe { *bytes };
    bytes[..16].copy_from_slice(addr);
    // The ports are the last 4 bytes: the source's first.
    let port_at = if src { N - 4 } else { N - 2 };
    bytes[port_at..port_at + 2].copy_from_slice(&port.to_ne_bytes());
    ctx.store(at, &bytes)
}

/// What `bpf_csum_diff(old, 16, new, 16, 0)` returns: the 32-bit ones' complement sum of the
/// complemented old words and the new words (end-around carries folded in).
#[inline(always)]
#[expect(
    clippy::cast_possible_truncation,
    reason = "folded twice, the sum fits in 32 bits"
)]
fn csum_diff128(old: &[u32; 4], new: &[u32; 4]) -> u32 {
    let mut sum = 0u64;
    let mut i = 0;
    while i < 4 {
        sum += u64::from(!old[i]) + u64::from(new[i]);
        i += 1;
    }
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum as u32
}

/// The first four bytes of `a` as a word (an IPv4 address), as they lie in memory.
#[inline(always)]
fn word(a: &Addr) -> u32 {
    u32::from_ne_bytes([a[0], a[1], a[2], a[3]])
}

#[inline(always)]
fn words(a: &Addr) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// Rewrites only the address of `end`, fixing the IPv4 header checksum. The transport checksum
/// is the caller's: ICMP errors use it (`ICMPv4` has no pseudo header; the caller folds the change
/// into the `ICMPv6` checksum itself).
#[inline(always)]
pub fn nat_rewrite_l3(ctx: &TcContext, pkt: &Parsed, end: End, addr: &Addr) -> Result<(), ()> {
    let old_addr = if end == End::Src { &pkt.src } else { &pkt.dst };
    if pkt.family == FAMILY_V4 {
        let (old, new) = (word(old_addr), word(addr));
        let addr_off = ETH_HLEN + if end == End::Src { 12 } else { 16 };
        ctx.l3_csum_replace(IPV4_CHECK, u64::from(old), u64::from(new), 4)
            .map_err(|_| ())?;
        ctx.store(addr_off, &new, 0).map_err(|_| ())
    } else {
        let addr_off = ETH_HLEN + if end == End::Src { 8 } else { 24 };
        ctx.store(addr_off, addr, 0).map_err(|_| ())
    }
}
