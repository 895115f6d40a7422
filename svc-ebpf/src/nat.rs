//! Address and port rewriting with checksum fix-ups by the kernel's own helpers.
//!
//! The helpers are the right tool here, not hand-rolled arithmetic: packets a pod's stack
//! sends over veth are usually `CHECKSUM_PARTIAL` (the L4 field holds only the pseudo-header
//! sum), and `bpf_l4_csum_replace` with `BPF_F_PSEUDO_HDR` treats PARTIAL, COMPLETE and plain
//! packets alike correctly; `BPF_F_MARK_MANGLED_0` keeps a UDP "no checksum" zero as zero.

use aya_ebpf::{helpers::bpf_csum_diff, programs::TcContext};
use svc_common::{
    addr::{Addr, FAMILY_V4},
    net::ipproto,
};

use crate::parse::{ETH_HLEN, Parsed};

/// `BPF_F_PSEUDO_HDR` (uapi): the changed field is part of the pseudo header.
const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
/// `BPF_F_MARK_MANGLED_0` (uapi): a zero UDP checksum stays zero, a computed zero becomes ffff.
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;
/// Offset of the IPv4 header checksum.
const IPV4_CHECK: usize = ETH_HLEN + 10;

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
#[inline(never)]
pub fn nat_rewrite(
    ctx: &TcContext,
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
    if pkt.family == FAMILY_V4 {
        let old = u32::from_ne_bytes([old_addr[0], old_addr[1], old_addr[2], old_addr[3]]);
        let new = u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]);
        let addr_off = ETH_HLEN + if end == End::Src { 12 } else { 16 };
        ctx.l4_csum_replace(
            check_off,
            u64::from(old),
            u64::from(new),
            BPF_F_PSEUDO_HDR | mangled | 4,
        )
        .map_err(|_| ())?;
        ctx.l3_csum_replace(IPV4_CHECK, u64::from(old), u64::from(new), 4)
            .map_err(|_| ())?;
        ctx.store(addr_off, &new, 0).map_err(|_| ())?;
    } else {
        let mut old = words(old_addr);
        let mut new = words(addr);
        let addr_off = ETH_HLEN + if end == End::Src { 8 } else { 24 };
        // SAFETY: both buffers are 16 bytes on this stack frame, as the sizes say.
        let diff = unsafe { bpf_csum_diff(old.as_mut_ptr(), 16, new.as_mut_ptr(), 16, 0) };
        if diff < 0 {
            return Err(());
        }
        ctx.l4_csum_replace(
            check_off,
            0,
            diff.cast_unsigned(),
            BPF_F_PSEUDO_HDR | mangled,
        )
        .map_err(|_| ())?;
        ctx.store(addr_off, addr, 0).map_err(|_| ())?;
    }
    if port != old_port {
        let port_off = pkt.l4_off + if end == End::Src { 0 } else { 2 };
        ctx.l4_csum_replace(check_off, u64::from(old_port), u64::from(port), mangled | 2)
            .map_err(|_| ())?;
        ctx.store(port_off, &port, 0).map_err(|_| ())?;
    }
    Ok(())
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
        let old = u32::from_ne_bytes([old_addr[0], old_addr[1], old_addr[2], old_addr[3]]);
        let new = u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]);
        let addr_off = ETH_HLEN + if end == End::Src { 12 } else { 16 };
        ctx.l3_csum_replace(IPV4_CHECK, u64::from(old), u64::from(new), 4)
            .map_err(|_| ())?;
        ctx.store(addr_off, &new, 0).map_err(|_| ())
    } else {
        let addr_off = ETH_HLEN + if end == End::Src { 8 } else { 24 };
        ctx.store(addr_off, addr, 0).map_err(|_| ())
    }
}
