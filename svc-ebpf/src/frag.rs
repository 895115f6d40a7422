//! Later IP fragments of translated datagrams follow their first fragment (see
//! `svc_common::frag` for the map and what is and is not covered).
//!
//! First fragment translated (the usual path: it has the ports) -> remember the addresses it
//! left with under the addresses it came with and its IP identification. Later fragment ->
//! look its datagram up -> the same addresses, the IPv4 header checksum brought up to date
//! (no transport header, so no transport checksum: the first fragment's covers the whole
//! datagram and was updated there).

use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, programs::TcContext};
use svc_common::{
    addr::{Addr, FAMILY_V4, from_v4},
    csum,
    frag::{FRAG_TIMEOUT_NS, FragKey, FragValue},
};

use crate::{
    maps::FRAG_V1,
    parse::{ETH_HLEN, Parsed, frag, frag_id, ptr_at},
};

/// The datagram a fragment belongs to, by the addresses it arrived with.
#[inline(always)]
fn frag_key(ctx: &TcContext, pkt: &Parsed) -> Option<FragKey> {
    Some(FragKey {
        src: pkt.src,
        dst: pkt.dst,
        id: frag_id(ctx, pkt)?,
        proto: pkt.proto,
        family: pkt.family,
        _pad: [0; 2],
    })
}

/// After a first fragment was translated (the packet holds its new addresses): remembers
/// them for the datagram's later fragments, with `flags` (`frag_flags`). Anything else is
/// left alone. A full table evicts its oldest entry; a failed insert only costs this datagram
/// its later fragments (passed untranslated, counted).
#[inline(never)]
pub fn frag_remember(ctx: &TcContext, pkt: &Parsed, flags: u32) {
    if pkt.frag != frag::FIRST {
        return;
    }
    // The key first: the addresses are read after the translation rewrote them.
    let (Some(key), Some((src, dst))) = (frag_key(ctx, pkt), packet_addrs(ctx, pkt.family)) else {
        return;
    };
    let value = FragValue {
        src,
        dst,
        // SAFETY: the helper has no preconditions.
        created: unsafe { bpf_ktime_get_coarse_ns() },
        flags,
        _pad: 0,
    };
    let _ = FRAG_V1.insert(&key, &value, 0);
}

/// A later fragment: gives it the addresses its first fragment left with. `Ok(Some(flags))`
/// when it was rewritten, `Ok(None)` when its datagram is not known here (first fragment not
/// seen, not translated, or too long ago).
#[inline(never)]
pub fn frag_follow(ctx: &TcContext, pkt: &Parsed) -> Result<Option<u32>, ()> {
    let key = frag_key(ctx, pkt).ok_or(())?;
    // SAFETY: copied out at once.
    let Some(v) = (unsafe { FRAG_V1.get(&key) }).copied() else {
        return Ok(None);
    };
    // SAFETY: the helper has no preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if now.saturating_sub(v.created) > FRAG_TIMEOUT_NS {
        return Ok(None);
    }
    if pkt.family == FAMILY_V4 {
        // Header bytes 10..20: checksum, source, destination; written back in one store.
        let hdr = ptr_at::<[u8; 10]>(ctx, ETH_HLEN + 10).ok_or(())?;
        // SAFETY: `ptr_at` checked the bytes are inside the packet.
        let mut hdr = unsafe { *hdr };
        let word = |b: &[u8]| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
        let (new_src, new_dst) = (word(&v.src), word(&v.dst));
        let mut check = u16::from_ne_bytes([hdr[0], hdr[1]]);
        check = csum::replace32(check, word(&hdr[2..6]), new_src);
        check = csum::replace32(check, word(&hdr[6..10]), new_dst);
        hdr[..2].copy_from_slice(&check.to_ne_bytes());
        hdr[2..6].copy_from_slice(&new_src.to_ne_bytes());
        hdr[6..10].copy_from_slice(&new_dst.to_ne_bytes());
        ctx.store(ETH_HLEN + 10, &hdr, 0).map_err(|_| ())?;
    } else {
        let addrs: [Addr; 2] = [v.src, v.dst];
        ctx.store(ETH_HLEN + 8, &addrs, 0).map_err(|_| ())?;
    }
    Ok(Some(v.flags))
}

/// The source and destination addresses the packet holds now.
#[inline(always)]
fn packet_addrs(ctx: &TcContext, family: u8) -> Option<(Addr, Addr)> {
    if family == FAMILY_V4 {
        let a = ptr_at::<[u8; 8]>(ctx, ETH_HLEN + 12)?;
        // SAFETY: `ptr_at` checked the bytes are inside the packet.
        let a = unsafe { *a };
        Some((
            from_v4([a[0], a[1], a[2], a[3]]),
            from_v4([a[4], a[5], a[6], a[7]]),
        ))
    } else {
        let a = ptr_at::<[Addr; 2]>(ctx, ETH_HLEN + 8)?;
        // SAFETY: as above.
        let [s, d] = unsafe { *a };
        Some((s, d))
    }
}
