//! The two contexts a frame from the outside world arrives in: a socket buffer (TC) and an XDP
//! buffer. The steps both node-facing programs share (parse, rewrite, route) read and write the
//! frame through [`Frame`], so there is one copy of each, compiled for each program.
//!
//! A TC frame is rewritten through the kernel's helpers, which know whether the socket buffer
//! is `CHECKSUM_PARTIAL`. An XDP frame is plain bytes with complete checksums (what arrives
//! on a wire), rewritten in place, its checksums updated by RFC 1624 arithmetic with the
//! semantics of `bpf_l4_csum_replace`.

use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{EbpfContext as _, programs::TcContext, programs::XdpContext};
use svc_common::csum;

/// `BPF_F_MARK_MANGLED_0` (uapi): a zero UDP checksum stays zero, a computed zero becomes ffff.
pub const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;
/// The size bits of `bpf_l4_csum_replace`'s flags (0: `to` is a checksum difference).
const CSUM_SIZE_MASK: u64 = 0xf;

/// A frame the node-facing steps can read and rewrite.
pub trait Frame {
    /// Address of the frame's first byte.
    fn data(&self) -> usize;
    /// Address one past the frame's last byte (of its linear part, for a socket buffer).
    fn data_end(&self) -> usize;
    /// The frame's whole length.
    fn len(&self) -> u32;
    /// The context as the helpers take it (`struct __sk_buff *` or `struct xdp_md *`).
    fn raw(&self) -> *mut c_void;
    /// The interface the frame arrived on.
    fn ingress_ifindex(&self) -> u32;
    /// Writes `v` at `off`.
    fn store<T: Copy>(&self, off: usize, v: &T) -> Result<(), ()>;
    /// Updates the transport checksum at `off` for a change of `from` to `to`, with the flags
    /// and meaning of `bpf_l4_csum_replace` (size 2 or 4 in the low bits, or 0: `to` is a
    /// difference as `bpf_csum_diff` returns it; `BPF_F_PSEUDO_HDR`; `BPF_F_MARK_MANGLED_0`).
    fn l4_csum_replace(&self, off: usize, from: u64, to: u64, flags: u64) -> Result<(), ()>;
}

/// Returns a pointer to a `T` at `off` bytes into the frame, if all of it is in bounds.
#[inline(always)]
pub fn ptr_at<T>(ctx: &impl Frame, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

impl Frame for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        Self::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        Self::data_end(self)
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        Self::len(self)
    }

    #[inline(always)]
    fn raw(&self) -> *mut c_void {
        self.as_ptr()
    }

    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: `skb` is this program's context.
        unsafe { (*self.skb.skb).ingress_ifindex }
    }

    #[inline(always)]
    fn store<T: Copy>(&self, off: usize, v: &T) -> Result<(), ()> {
        Self::store(self, off, v, 0).map_err(|_| ())
    }

    #[inline(always)]
    fn l4_csum_replace(&self, off: usize, from: u64, to: u64, flags: u64) -> Result<(), ()> {
        Self::l4_csum_replace(self, off, from, to, flags).map_err(|_| ())
    }
}

impl Frame for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        Self::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        Self::data_end(self)
    }

    #[inline(always)]
    #[expect(
        clippy::cast_possible_truncation,
        reason = "an XDP buffer is at most a page"
    )]
    fn len(&self) -> u32 {
        (Self::data_end(self) - Self::data(self)) as u32
    }

    #[inline(always)]
    fn raw(&self) -> *mut c_void {
        self.as_ptr()
    }

    #[inline(always)]
    #[expect(
        clippy::cast_possible_truncation,
        reason = "the kernel's ifindex is 32 bits"
    )]
    fn ingress_ifindex(&self) -> u32 {
        Self::ingress_ifindex(self) as u32
    }

    #[inline(always)]
    fn store<T: Copy>(&self, off: usize, v: &T) -> Result<(), ()> {
        let p = ptr_at::<T>(self, off).ok_or(())?;
        // SAFETY: `ptr_at` checked the bytes are inside the frame; it may be unaligned.
        unsafe { p.write_unaligned(*v) };
        Ok(())
    }

    #[inline(always)]
    #[expect(
        clippy::cast_possible_truncation,
        reason = "the sizes say how many bits of `from` and `to` count"
    )]
    fn l4_csum_replace(&self, off: usize, from: u64, to: u64, flags: u64) -> Result<(), ()> {
        let p = ptr_at::<u16>(self, off).ok_or(())?;
        // SAFETY: `ptr_at` checked both bytes are inside the frame.
        let old = unsafe { p.read_unaligned() };
        let mangled_0 = flags & BPF_F_MARK_MANGLED_0 != 0;
        if mangled_0 && old == 0 {
            // A UDP datagram without a checksum keeps none.
            return Ok(());
        }
        let new = match flags & CSUM_SIZE_MASK {
            0 => csum::replace_diff(old, to as u32),
            2 => csum::replace16(old, from as u16, to as u16),
            4 => csum::replace32(old, from as u32, to as u32),
            _ => return Err(()),
        };
        let new = if mangled_0 && new == 0 { 0xffff } else { new };
        // SAFETY: as above.
        unsafe { p.write_unaligned(new) };
        Ok(())
    }
}
