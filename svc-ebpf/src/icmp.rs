//! ICMP errors about a translated flow, on their way back to the client pod.
//!
//! A backend (or a router between) answers the client's translated packet with an ICMP error
//! (port unreachable, fragmentation needed / packet too big, time exceeded) that quotes the
//! packet as it was sent: client -> backend. The client's stack matches errors to its socket by
//! that quote, and its socket talks to the VIP, so the quote's destination is put back to the
//! VIP and port, the outer source too when the error came from the backend itself; then the
//! quoted IP header's checksum, the quoted UDP/TCP checksum (when quoted) and the ICMP
//! checksum are brought up to date. Supported quotes: IPv4 without options, IPv6 without
//! extension headers, TCP or UDP inside.

use aya_ebpf::programs::TcContext;
use svc_common::{
    Be16,
    addr::{Addr, FAMILY_V4},
    conntrack::{CtKey, dir},
    csum,
    net::ipproto,
};

use crate::{
    maps::{CT_NEW_V1, CT_V1},
    nat::{End, nat_rewrite_l3},
    parse::{Parsed, ptr_at},
};

/// `ICMPv4` error types: destination unreachable, time exceeded, parameter problem.
const ICMP4_ERRORS: [u8; 3] = [3, 11, 12];
/// `ICMPv6` error types: destination unreachable, packet too big, time exceeded, parameter
/// problem.
const ICMP6_ERRORS: [u8; 4] = [1, 2, 3, 4];

/// Offsets of what an error quotes.
struct Quote {
    /// The quoted IP header.
    ip: usize,
    /// The quoted transport header.
    l4: usize,
    /// The quoted transport protocol.
    proto: u8,
}

/// Rewrites an ICMP error about a translated flow; `Ok(Some((frontend id, backend id)))` when
/// it was one (for counters), `Ok(None)` when the packet is not such an error.
#[inline(never)]
pub fn icmp_error_to_pod(ctx: &TcContext, pkt: &Parsed) -> Result<Option<(u32, u32)>, ()> {
    let v4 = pkt.family == FAMILY_V4;
    let Some(ty) = ptr_at::<u8>(ctx, pkt.l4_off) else {
        return Ok(None);
    };
    // SAFETY: `ptr_at` checked the byte is inside the packet.
    let ty = unsafe { *ty };
    let is_error = if v4 {
        ICMP4_ERRORS.contains(&ty)
    } else {
        ICMP6_ERRORS.contains(&ty)
    };
    if !is_error {
        return Ok(None);
    }
    let Some(q) = quote(ctx, pkt, v4) else {
        return Ok(None);
    };
    // A quote cut short (before the ports) names no flow: the error is passed as it is.
    let Some((inner_src, inner_dst)) = quoted_addrs(ctx, &q, v4) else {
        return Ok(None);
    };
    let Some(ports) = ptr_at::<[u16; 2]>(ctx, q.l4) else {
        return Ok(None);
    };
    // SAFETY: `ptr_at` checked both ports are inside the packet.
    let [quoted_client_port, quoted_backend_port] = unsafe { *ports };
    // The quote is client -> backend: its reply entry is keyed backend -> client.
    let key = CtKey {
        src: inner_dst,
        dst: inner_src,
        sport: Be16(quoted_backend_port),
        dport: Be16(quoted_client_port),
        proto: q.proto,
        family: pkt.family,
        dir: dir::REPLY,
        _pad: 0,
    };
    // An error is no answer: the flow may still be in the table of unanswered ones.
    // SAFETY: only the fields needed are copied out, at once.
    let Some(entry) = (unsafe { CT_V1.get(&key).or_else(|| CT_NEW_V1.get(&key)) }) else {
        return Ok(None);
    };
    let entry = Vip {
        addr: entry.addr,
        port: entry.port,
        ids: (entry.frontend_id, entry.backend_id),
    };

    let icmp_check_off = pkt.l4_off + 2;
    let mut icmp_check = load16(ctx, icmp_check_off)?;
    // The quoted destination address and port become the VIP's.
    let dst_off = q.ip + if v4 { 16 } else { 24 };
    if v4 {
        let (old, new) = (word(&inner_dst, 0), word(&entry.addr, 0));
        let ip_check_off = q.ip + 10;
        let old_ip_check = load16(ctx, ip_check_off)?;
        let new_ip_check = csum::replace32(old_ip_check, old, new);
        store(ctx, ip_check_off, &new_ip_check)?;
        icmp_check = csum::replace16(icmp_check, old_ip_check, new_ip_check);
        icmp_check = csum::replace32(icmp_check, old, new);
        store(ctx, dst_off, &new)?;
    } else {
        icmp_check = csum::replace128(icmp_check, &words(&inner_dst), &words(&entry.addr));
        store(ctx, dst_off, &entry.addr)?;
    }
    icmp_check = csum::replace16(icmp_check, quoted_backend_port, entry.port.0);
    store(ctx, q.l4 + 2, &entry.port.0)?;
    // The quoted transport checksum, when the quote holds it.
    let l4_check_off = q.l4 + if q.proto == ipproto::TCP { 16 } else { 6 };
    if let Some(p) = ptr_at::<u16>(ctx, l4_check_off) {
        // SAFETY: `ptr_at` checked the field is inside the packet.
        let old_check = unsafe { *p };
        if !(q.proto == ipproto::UDP && old_check == 0) {
            let mut c = if v4 {
                csum::replace32(old_check, word(&inner_dst, 0), word(&entry.addr, 0))
            } else {
                csum::replace128(old_check, &words(&inner_dst), &words(&entry.addr))
            };
            c = csum::replace16(c, quoted_backend_port, entry.port.0);
            if q.proto == ipproto::UDP {
                c = csum::udp_fixup(old_check, c);
            }
            store(ctx, l4_check_off, &c)?;
            icmp_check = csum::replace16(icmp_check, old_check, c);
        }
    }
    // The outer source, when the backend itself sent the error (a router keeps its address).
    if pkt.src == inner_dst {
        if !v4 {
            // The ICMPv6 checksum covers the outer addresses (pseudo header).
            icmp_check = csum::replace128(icmp_check, &words(&pkt.src), &words(&entry.addr));
        }
        store(ctx, icmp_check_off, &icmp_check)?;
        nat_rewrite_l3(ctx, pkt, End::Src, &entry.addr)?;
    } else {
        store(ctx, icmp_check_off, &icmp_check)?;
    }
    Ok(Some(entry.ids))
}

/// What the error's quote is put back to, and the flow's counter ids.
struct Vip {
    addr: Addr,
    port: Be16,
    ids: (u32, u32),
}

/// Where the quoted headers are, if the quote is one this module handles.
#[inline(always)]
fn quote(ctx: &TcContext, pkt: &Parsed, v4: bool) -> Option<Quote> {
    let ip = pkt.l4_off + 8;
    let (l4, proto) = if v4 {
        let vihl = ptr_at::<[u8; 10]>(ctx, ip)?;
        // SAFETY: `ptr_at` checked the bytes are inside the packet.
        let h = unsafe { *vihl };
        if h[0] != 0x45 {
            return None;
        }
        (ip + 20, h[9])
    } else {
        let h = ptr_at::<[u8; 8]>(ctx, ip)?;
        // SAFETY: as above.
        let h = unsafe { *h };
        if h[0] >> 4 != 6 {
            return None;
        }
        (ip + 40, h[6])
    };
    (proto == ipproto::TCP || proto == ipproto::UDP).then_some(Quote { ip, l4, proto })
}

/// The quoted source and destination addresses.
#[inline(always)]
fn quoted_addrs(ctx: &TcContext, q: &Quote, v4: bool) -> Option<(Addr, Addr)> {
    if v4 {
        let a = ptr_at::<[u8; 8]>(ctx, q.ip + 12)?;
        // SAFETY: `ptr_at` checked the bytes are inside the packet.
        let a = unsafe { *a };
        Some((
            svc_common::addr::from_v4([a[0], a[1], a[2], a[3]]),
            svc_common::addr::from_v4([a[4], a[5], a[6], a[7]]),
        ))
    } else {
        let a = ptr_at::<[[u8; 16]; 2]>(ctx, q.ip + 8)?;
        // SAFETY: as above.
        let [s, d] = unsafe { *a };
        Some((s, d))
    }
}

#[inline(always)]
fn load16(ctx: &TcContext, off: usize) -> Result<u16, ()> {
    let p = ptr_at::<u16>(ctx, off).ok_or(())?;
    // SAFETY: `ptr_at` checked the field is inside the packet.
    Ok(unsafe { *p })
}

#[inline(always)]
fn store<T>(ctx: &TcContext, off: usize, v: &T) -> Result<(), ()> {
    ctx.store(off, v, 0).map_err(|_| ())
}

#[inline(always)]
fn word(a: &Addr, i: usize) -> u32 {
    u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]])
}

#[inline(always)]
fn words(a: &Addr) -> [u32; 4] {
    [word(a, 0), word(a, 4), word(a, 8), word(a, 12)]
}
