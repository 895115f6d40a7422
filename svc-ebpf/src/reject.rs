//! Rejecting a connection at once when its service has no endpoint: TCP gets a reset, UDP an
//! ICMP (v4) or `ICMPv6` port unreachable, both sent from the service address back out of the
//! pod's own veth, so the client fails in microseconds instead of timing out.
//!
//! The reply is built whole on the stack (Ethernet + IP + TCP or ICMP with its quote), the
//! packet is resized to it with `bpf_skb_change_tail`, written in one store and redirected.
//! What the builder does not cover (IPv4 options or IPv6 extension headers on the request, a
//! TCP reset answering a reset) falls back to a counted drop.
//!
//! Checksum offload: the reply is written over the request and keeps its `skb` state, and no
//! helper on Linux 6.18 resets a `CHECKSUM_PARTIAL` packet (`bpf_csum_level` only touches
//! `CHECKSUM_UNNECESSARY`, `bpf_skb_change_tail` only `CHECKSUM_COMPLETE`). A pod's request
//! usually is `CHECKSUM_PARTIAL` (`csum_start` at its transport header, `csum_offset` 16 for
//! TCP, 6 for UDP): whoever finishes the checksum (a device, or `skb_checksum_help` on a path
//! without offload) sums from `csum_start` and writes at `csum_offset`, expecting the
//! pseudo-header sum there. So the reply's transport header starts where the request's did,
//! and the field at the request's checksum offset is finished by `bpf_l4_csum_replace`, which
//! knows the packet's state: see [`finish_checksums`].

use aya_ebpf::{
    helpers::{bpf_redirect, bpf_skb_change_tail, bpf_skb_store_bytes},
    programs::TcContext,
};
use network_types::{eth::EthHdr, tcp::TcpHdr};
use svc_common::{addr::FAMILY_V4, csum, net::ipproto};

use crate::parse::{
    self, ETH_HLEN, Parsed, ptr_at,
    tcp_flags::{self, ACK, RST, SYN},
};

/// TTL / hop limit of generated packets.
const TTL: u8 = 64;
/// Largest generated frame: Ethernet + IPv6 + `ICMPv6` + quoted IPv6 header and 8 bytes.
const MAX_FRAME: usize = 14 + 40 + 8 + 48;
/// `BPF_F_PSEUDO_HDR` (uapi): the change is to the pseudo header.
const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
/// `BPF_F_RECOMPUTE_CSUM` (uapi): keep a `CHECKSUM_COMPLETE` packet's sum up to date.
const BPF_F_RECOMPUTE_CSUM: u64 = 1 << 0;

/// What [`finish_checksums`] has to do after the frame is written.
struct Finish {
    /// Offset of the field at the request's transport checksum offset (the reply's TCP
    /// checksum; inside an ICMP reply, bytes 6..8, the second half of its unused word).
    field: usize,
    /// Sum of the reply's pseudo header (0 for `ICMPv4`, which has none).
    pseudo: u32,
    /// What the second call adds. TCP: the sum of the header the frame holds (checksum
    /// zero). ICMP: the complement of `pseudo` (the frame's checksum is complete, the field
    /// holds zero and must end as zero).
    data: u32,
}
/// Turns the packet into the rejection reply and redirects it back to the pod. On success the
/// program must return `TC_ACT_REDIRECT`.
#[inline(never)]
pub fn reject(ctx: &TcContext, pkt: &Parsed) -> Result<(), ()> {
    let mut frame = [0u8; MAX_FRAME];
    // The reply's transport header goes where the request's is (see the module doc).
    let l4_off = ETH_HLEN + if pkt.family == FAMILY_V4 { 20 } else { 40 };
    if pkt.l4_off != l4_off {
        return Err(());
    }
    let (len, finish) = if pkt.proto == ipproto::TCP {
        build_tcp_reset(ctx, pkt, &mut frame)?
    } else {
        build_unreachable(ctx, pkt, &mut frame)?
    };
    // SAFETY: ctx.skb.skb is the program's own context; `len` <= MAX_FRAME, the buffer's size.
    unsafe {
        if bpf_skb_change_tail(ctx.skb.skb, len as u32, 0) != 0 {
            return Err(());
        }
        let (data, n) = (frame.as_ptr().cast(), len as u32);
        if bpf_skb_store_bytes(ctx.skb.skb, 0, data, n, BPF_F_RECOMPUTE_CSUM) != 0 {
            return Err(());
        }
    }
    finish_checksums(ctx, &finish)?;
    // SAFETY: ctx.skb.skb is the program's own context.
    unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) };
    Ok(())
}

/// Makes the reply's checksums right whatever the packet's offload state, with two
/// `bpf_l4_csum_replace` calls on the field at the request's checksum offset (which holds
/// zero): the first adds the pseudo-header sum `P` (flagged as such), the second adds `D`.
///
/// - `CHECKSUM_NONE` / `UNNECESSARY` (every fixture, and a request whose stack computed its
///   checksum): both are added, the field ends as `~(P + D)`. TCP: `D` is the header's sum, so
///   the field is the full checksum. ICMP: `D = ~P`, so the field ends as zero and the
///   checksum the frame holds stands.
/// - `CHECKSUM_PARTIAL` (a pod's usual request): the kernel ignores the second call and turns
///   the first into "field = `P`", the pseudo-header sum a `PARTIAL` packet must hold there.
///   Whoever finishes it sums from `csum_start` (the reply's transport header) and writes the
///   complement there. TCP: the full checksum. ICMP: the message then sums to zero with any
///   checksum field; the frame's own stays right and bytes 6..8 become `0xffff` (ones'
///   complement zero: unused for a port unreachable).
#[inline(always)]
fn finish_checksums(ctx: &TcContext, f: &Finish) -> Result<(), ()> {
    ctx.l4_csum_replace(f.field, 0, u64::from(f.pseudo), BPF_F_PSEUDO_HDR)
        .map_err(|_| ())?;
    ctx.l4_csum_replace(f.field, 0, u64::from(f.data), 0)
        .map_err(|_| ())
}

/// Ethernet header with the addresses swapped, and the IP header from the VIP to the client;
/// returns the offset where the transport header goes.
#[inline(always)]
fn build_l2_l3(
    ctx: &TcContext,
    pkt: &Parsed,
    frame: &mut [u8; MAX_FRAME],
    proto: u8,
    l4_len: u16,
) -> Result<usize, ()> {
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(())?;
    // SAFETY: `ptr_at` checked the header is inside the packet.
    let eth = unsafe { *eth };
    frame[0..6].copy_from_slice(&eth.src_addr);
    frame[6..12].copy_from_slice(&eth.dst_addr);
    frame[12..14].copy_from_slice(&eth.ether_type.to_ne_bytes());
    if pkt.family == FAMILY_V4 {
        let tot = (20 + l4_len).to_be_bytes();
        let ip = &mut frame[ETH_HLEN..ETH_HLEN + 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&tot);
        // Identification 0 with don't-fragment, as Linux sends its own resets.
        ip[6] = 0x40;
        ip[8] = TTL;
        ip[9] = proto;
        ip[12..16].copy_from_slice(&pkt.dst[..4]);
        ip[16..20].copy_from_slice(&pkt.src[..4]);
        let c = csum::checksum(ip);
        ip[10..12].copy_from_slice(&c.to_ne_bytes());
        Ok(ETH_HLEN + 20)
    } else {
        let ip = &mut frame[ETH_HLEN..ETH_HLEN + 40];
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&l4_len.to_be_bytes());
        ip[6] = proto;
        ip[7] = TTL;
        ip[8..24].copy_from_slice(&pkt.dst);
        ip[24..40].copy_from_slice(&pkt.src);
        Ok(ETH_HLEN + 40)
    }
}

/// Sum of the pseudo header (addresses of the reply, protocol, transport length).
#[inline(always)]
fn pseudo_sum(pkt: &Parsed, proto: u8, l4_len: u16) -> u32 {
    let n = if pkt.family == FAMILY_V4 { 4 } else { 16 };
    let mut s = csum::sum_bytes(0, &pkt.dst[..n]);
    s = csum::sum_bytes(s, &pkt.src[..n]);
    csum::sum_bytes(s, &[0, proto, (l4_len >> 8) as u8, l4_len as u8])
}

/// A TCP reset for the segment (RFC 9293 3.10.7.1): if the segment carried an ACK the reset
/// takes its sequence number from it, otherwise it acknowledges the segment.
#[inline(always)]
fn build_tcp_reset(
    ctx: &TcContext,
    pkt: &Parsed,
    frame: &mut [u8; MAX_FRAME],
) -> Result<(usize, Finish), ()> {
    if pkt.tcp_flags & tcp_flags::RST != 0 {
        return Err(());
    }
    let tcp = ptr_at::<TcpHdr>(ctx, pkt.l4_off).ok_or(())?;
    // SAFETY: `ptr_at` checked the header is inside the packet.
    let tcp = unsafe { *tcp };
    let doff = u32::from(tcp.doff()) * 4;
    // The segment: from the TCP header to the end of the IP packet (BIG TCP included).
    let segment = parse::ip_end(ctx, pkt)
        .ok_or(())?
        .saturating_sub(pkt.l4_off) as u32;
    let seg_len = segment.saturating_sub(doff)
        + u32::from(pkt.tcp_flags & SYN != 0)
        + u32::from(pkt.tcp_flags & tcp_flags::FIN != 0);
    let (seq, ack, flags) = if pkt.tcp_flags & ACK != 0 {
        (u32::from_be_bytes(tcp.ack_seq), 0, RST)
    } else {
        (
            0,
            u32::from_be_bytes(tcp.seq).wrapping_add(seg_len),
            RST | ACK,
        )
    };
    let off = build_l2_l3(ctx, pkt, frame, ipproto::TCP, 20)?;
    let th = &mut frame[off..off + 20];
    th[0..2].copy_from_slice(&pkt.dport.to_ne_bytes());
    th[2..4].copy_from_slice(&pkt.sport.to_ne_bytes());
    th[4..8].copy_from_slice(&seq.to_be_bytes());
    th[8..12].copy_from_slice(&ack.to_be_bytes());
    th[12] = 5 << 4;
    th[13] = flags;
    // The checksum (zero here) is finished after the store, see `finish_checksums`.
    let finish = Finish {
        field: off + 16,
        pseudo: pseudo_sum(pkt, ipproto::TCP, 20),
        data: csum::sum_bytes(0, th),
    };
    Ok((off + 20, finish))
}

/// An ICMP port unreachable (v4 type 3 code 3, v6 type 1 code 4) quoting the request's IP
/// header and the first 8 bytes after it.
#[inline(always)]
fn build_unreachable(
    ctx: &TcContext,
    pkt: &Parsed,
    frame: &mut [u8; MAX_FRAME],
) -> Result<(usize, Finish), ()> {
    let v4 = pkt.family == FAMILY_V4;
    let quote_len: usize = if v4 { 28 } else { 48 };
    let l4_len = (8 + quote_len) as u16;
    let proto = if v4 { ipproto::ICMP } else { ipproto::ICMPV6 };
    let off = build_l2_l3(ctx, pkt, frame, proto, l4_len)?;
    if v4 {
        let q = ptr_at::<[u8; 28]>(ctx, ETH_HLEN).ok_or(())?;
        // SAFETY: `ptr_at` checked the bytes are inside the packet.
        frame[off + 8..off + 36].copy_from_slice(unsafe { &*q });
        frame[off] = 3;
        frame[off + 1] = 3;
        let c = csum::checksum(&frame[off..off + 36]);
        frame[off + 2..off + 4].copy_from_slice(&c.to_ne_bytes());
        let finish = Finish {
            field: off + 6,
            pseudo: 0,
            data: 0xffff,
        };
        Ok((off + 36, finish))
    } else {
        let q = ptr_at::<[u8; 48]>(ctx, ETH_HLEN).ok_or(())?;
        // SAFETY: as above.
        frame[off + 8..off + 56].copy_from_slice(unsafe { &*q });
        frame[off] = 1;
        frame[off + 1] = 4;
        let pseudo = pseudo_sum(pkt, proto, l4_len);
        let c = csum::finish(csum::sum_bytes(pseudo, &frame[off..off + 56]));
        frame[off + 2..off + 4].copy_from_slice(&c.to_ne_bytes());
        let finish = Finish {
            field: off + 6,
            pseudo,
            data: u32::from(!csum::fold(pseudo)),
        };
        Ok((off + 56, finish))
    }
}
