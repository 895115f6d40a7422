//! Packet parsing: Ethernet, then IPv4 or IPv6 (with its extension headers), then the
//! transport header. The parser reads through direct packet access and never writes.
//!
//! Policy: a packet the parser cannot make sense of is *not ours*. It is counted under a named
//! reason and handed to the kernel stack untouched, whose own validation decides its fate.

use crate::frame::Frame;
pub use crate::frame::ptr_at;
use aya_ebpf::programs::TcContext;
use network_types::{
    eth::EthHdr,
    icmp::Icmpv4Hdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};
use svc_common::{
    addr::{Addr, FAMILY_V4, FAMILY_V6},
    net::{ETH_P_IP, ETH_P_IPV6, ipproto},
    stats::PktCounter,
};

/// Length of an Ethernet header.
pub const ETH_HLEN: usize = EthHdr::LEN;
/// How many leading bytes the parser wants in the linear part of the packet.
const PARSE_WINDOW: u32 = 128;
/// How many IPv6 extension headers the parser follows before giving up.
const MAX_IPV6_EXT: usize = 4;
/// Minimum length of an `ICMPv6` header (type, code, checksum, 4 bytes of body).
const ICMPV6_HLEN: usize = 8;

/// Parses the headers of the frame in `ctx` (see [`parse`]), first from the linear part as it
/// is; only when that did not see every header the caller needs and the packet has bytes
/// beyond the linear part does it pull up to `PARSE_WINDOW` bytes in and parse again.
/// `quotes`: the caller also reads the headers an ICMP error quotes.
///
/// Pulling is not free: `bpf_skb_pull_data` makes the head writable, and a TCP segment from a
/// local stack is a clone whose payload sits in page fragments, so pulling payload bytes into
/// its head reallocates and copies the head (`pskb_expand_head`). Most packets have every
/// header in the linear part already: they are parsed once and never pulled.
#[inline(always)]
pub fn parse_pulled(ctx: &TcContext, quotes: bool) -> Parsed {
    let pkt = parse(ctx);
    let want = if ctx.len() < PARSE_WINDOW {
        ctx.len()
    } else {
        PARSE_WINDOW
    };
    let linear = ctx.data_end() - ctx.data();
    if linear as u32 >= want || !missed_headers(&pkt, linear, quotes) {
        return pkt;
    }
    // A failed pull leaves the packet as it was; the parse below then sees the same bytes.
    let _ = ctx.pull_data(want);
    parse(ctx)
}

/// Whether a parse of a packet whose linear part is `linear` bytes long may have stopped short
/// of a header it needs: not for complete TCP/UDP headers, fragments and other transports,
/// ICMP unless its quote is wanted, or a non-IP `EtherType` it could read.
#[inline(always)]
fn missed_headers(pkt: &Parsed, linear: usize, quotes: bool) -> bool {
    match pkt.l4 {
        Some(PktCounter::Tcp | PktCounter::Udp | PktCounter::OtherL4 | PktCounter::Fragment) => {
            false
        }
        Some(PktCounter::Icmp | PktCounter::Icmpv6) => quotes,
        Some(_) => true,
        None => pkt.l3 != PktCounter::NonIp || linear < ETH_HLEN,
    }
}

/// TCP flag bits (byte 13 of the TCP header).
pub mod tcp_flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

/// Fragment kinds (`Parsed::frag`).
pub mod frag {
    /// Not a fragment, or a fragment this datapath does not handle (a first fragment without a
    /// complete TCP/UDP header).
    pub const NONE: u8 = 0;
    /// The first fragment of a TCP/UDP datagram (offset 0, more to come): it has the ports and
    /// is translated like a whole packet; its later fragments follow it (`FRAG_V1`).
    pub const FIRST: u8 = 1;
    /// A later fragment (offset > 0): no transport header.
    pub const LATER: u8 = 2;
}

/// What the parser found.
#[derive(Clone, Copy)]
pub struct Parsed {
    /// Which L3 counter the packet adds to.
    pub l3: PktCounter,
    /// Which L4 counter it adds to, if it got that far.
    pub l4: Option<PktCounter>,
    /// `FAMILY_V4` / `FAMILY_V6` for IP packets with a valid header, else 0.
    pub family: u8,
    /// The transport protocol number (after IPv6 extension headers).
    pub proto: u8,
    /// Offset of the transport header from the start of the frame.
    pub l4_off: usize,
    /// Source address (16 bytes, IPv4 in the first four), network order.
    pub src: Addr,
    /// Destination address, network order.
    pub dst: Addr,
    /// TCP/UDP source port as on the wire (network order); 0 otherwise.
    pub sport: u16,
    /// TCP/UDP destination port as on the wire; 0 otherwise.
    pub dport: u16,
    /// TCP flags byte; 0 otherwise.
    pub tcp_flags: u8,
    /// [`frag`] kind. (Its IP identification is read from the packet when needed, see
    /// [`frag_id`]: every byte of this struct costs stack in every program.)
    pub frag: u8,
}

impl Parsed {
    const fn l3_only(l3: PktCounter) -> Self {
        Self::ip(l3, None, 0, 0, 0, [0; 16], [0; 16])
    }

    const fn ip(
        l3: PktCounter,
        l4: Option<PktCounter>,
        family: u8,
        proto: u8,
        l4_off: usize,
        src: Addr,
        dst: Addr,
    ) -> Self {
        Self {
            l3,
            l4,
            family,
            proto,
            l4_off,
            src,
            dst,
            sport: 0,
            dport: 0,
            tcp_flags: 0,
            frag: frag::NONE,
        }
    }

    /// Whether this is a TCP or UDP packet with a complete header, unfragmented or the first
    /// fragment of its datagram: the ones services translate.
    pub fn is_tcp_or_udp(&self) -> bool {
        matches!(self.l4, Some(PktCounter::Tcp | PktCounter::Udp)) || self.frag == frag::FIRST
    }

    /// Marks a fragment: a first one whose transport header is complete TCP/UDP becomes
    /// [`frag::FIRST`], any later one [`frag::LATER`]; the counter is `Fragment` either way.
    #[inline(always)]
    fn mark_fragment(&mut self, first: bool) {
        self.frag = if !first {
            frag::LATER
        } else if self.is_tcp_or_udp() {
            frag::FIRST
        } else {
            frag::NONE
        };
        self.l4 = Some(PktCounter::Fragment);
    }

    /// Reads the ports (and TCP flags) of a complete TCP/UDP header.
    #[inline(always)]
    fn read_ports<C: Frame>(&mut self, ctx: &C) {
        if !self.is_tcp_or_udp() {
            return;
        }
        if let Some(ports) = ptr_at::<[u16; 2]>(ctx, self.l4_off) {
            // SAFETY: `ptr_at` checked both ports are inside the packet.
            let [sport, dport] = unsafe { *ports };
            self.sport = sport;
            self.dport = dport;
        }
        if let Some(flags) =
            ptr_at::<u8>(ctx, self.l4_off + 13).filter(|_| self.proto == ipproto::TCP)
        {
            // SAFETY: `ptr_at` checked the byte is inside the packet.
            self.tcp_flags = unsafe { *flags };
        }
    }
}

/// Parses the headers of the frame in `ctx`.
#[inline(always)]
pub fn parse<C: Frame>(ctx: &C) -> Parsed {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Parsed::l3_only(PktCounter::NonIp);
    };
    // SAFETY: `ptr_at` checked the header is inside the packet.
    let ether_type = unsafe { (*eth).ether_type };
    if ether_type == ETH_P_IP.0 {
        parse_ipv4(ctx)
    } else if ether_type == ETH_P_IPV6.0 {
        parse_ipv6(ctx)
    } else {
        Parsed::l3_only(PktCounter::NonIp)
    }
}

#[inline(always)]
fn parse_ipv4<C: Frame>(ctx: &C) -> Parsed {
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN) else {
        return Parsed::l3_only(PktCounter::MalformedIp);
    };
    // SAFETY: `ptr_at` checked the fixed header is inside the packet.
    let ip = unsafe { &*ip };
    let ihl = usize::from(ip.vihl & 0x0f) * 4;
    let tot_len = match usize::from(u16::from_be_bytes(ip.tot_len)) {
        // BIG TCP: a GSO packet longer than 64 KiB carries total length 0; its length is the
        // packet's (the kernel's `iph_totlen`). `ptr_at` checked the frame holds the header.
        0 => ctx.len() as usize - ETH_HLEN,
        n => n,
    };
    if ip.vihl >> 4 != 4
        || ihl < Ipv4Hdr::LEN
        || tot_len < ihl
        || ETH_HLEN + tot_len > ctx.len() as usize
    {
        return Parsed::l3_only(PktCounter::MalformedIp);
    }
    let l4_off = ETH_HLEN + ihl;
    let ip_end = ETH_HLEN + tot_len;
    let frags = u16::from_be_bytes(ip.frags);
    // Fragment offset (13 bits): only a first fragment (offset 0) has a transport header.
    let offset = frags & 0x1fff;
    let l4 = if offset == 0 {
        classify_l4(ctx, ip.proto, l4_off, ip_end)
    } else {
        PktCounter::Fragment
    };
    // Both addresses as two 32-bit loads, not eight byte loads the compiler keeps in eight
    // stack slots across the transport checks.
    // SAFETY: `ip` points at a whole header inside the packet; the read may be unaligned.
    let [src, dst] = unsafe { ip.src_addr.as_ptr().cast::<[u32; 2]>().read_unaligned() };
    let (src, dst) = (addr_from_word(src), addr_from_word(dst));
    let mut pkt = Parsed::ip(
        PktCounter::Ipv4,
        Some(l4),
        FAMILY_V4,
        ip.proto,
        l4_off,
        src,
        dst,
    );
    // More-fragments flag or a non-zero offset: a fragment.
    if frags & 0x3fff != 0 {
        pkt.mark_fragment(offset == 0);
    }
    pkt.read_ports(ctx);
    pkt
}

/// The IP identification of a fragment (IPv4: 16 bits zero-extended, IPv6: the fragment
/// header's 32 bits, which end where the transport part starts), raw as in the packet. Read
/// with a helper: a load before a variable offset is more than the verifier follows.
#[inline(always)]
pub fn frag_id(ctx: &TcContext, pkt: &Parsed) -> Option<u32> {
    if pkt.family == FAMILY_V4 {
        ctx.load::<u16>(ETH_HLEN + 4).ok().map(u32::from)
    } else {
        ctx.load::<u32>(pkt.l4_off.checked_sub(4)?).ok()
    }
}

/// The end of the IP packet (offset from the start of the frame): as its length says, or the
/// frame's end for a BIG TCP packet whose length is 0.
#[inline(always)]
pub fn ip_end(ctx: &TcContext, pkt: &Parsed) -> Option<usize> {
    let (len, hdr) = if pkt.family == FAMILY_V4 {
        (ctx.load::<[u8; 2]>(ETH_HLEN + 2).ok()?, 0)
    } else {
        (ctx.load::<[u8; 2]>(ETH_HLEN + 4).ok()?, Ipv6Hdr::LEN)
    };
    Some(match usize::from(u16::from_be_bytes(len)) {
        0 => ctx.len() as usize,
        n => ETH_HLEN + hdr + n,
    })
}

/// An IPv4 address (one word, network order) in [`Addr`] form: the word, then three zero
/// words. Built from words, not as a zeroed array written into: bpf-linker has LLVM turn a
/// zero-fill into a call to a byte-at-a-time `memset`, twice per IPv4 packet.
#[inline(always)]
fn addr_from_word(w: u32) -> Addr {
    // SAFETY: four words are sixteen bytes, any bit pattern is a valid byte array; the first
    // word keeps its bytes in memory order, which is the address's.
    unsafe { core::mem::transmute::<[u32; 4], Addr>([w, 0, 0, 0]) }
}

#[inline(always)]
fn parse_ipv6<C: Frame>(ctx: &C) -> Parsed {
    let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, ETH_HLEN) else {
        return Parsed::l3_only(PktCounter::MalformedIp);
    };
    // SAFETY: `ptr_at` checked the fixed header is inside the packet.
    let ip = unsafe { &*ip };
    let ip_end = match usize::from(u16::from_be_bytes(ip.payload_len)) {
        // BIG TCP: a GSO packet longer than 64 KiB carries payload length 0 (and, before Linux
        // 6.17 removed it, a hop-by-hop Jumbo Payload option, which the walk below skips); its
        // length is the packet's.
        0 => ctx.len() as usize,
        n => ETH_HLEN + Ipv6Hdr::LEN + n,
    };
    if ip.vcf[0] >> 4 != 6 || ip_end > ctx.len() as usize {
        return Parsed::l3_only(PktCounter::MalformedIp);
    }
    let mut next = ip.next_hdr;
    let mut off = ETH_HLEN + Ipv6Hdr::LEN;
    let mut l4 = None;
    // A fragment header: its kind (`frag`).
    let mut kind = frag::NONE;
    for _ in 0..MAX_IPV6_EXT {
        match next {
            ipproto::HOPOPTS | ipproto::ROUTING | ipproto::DSTOPTS => {
                let Some(ext) = ptr_at::<[u8; 2]>(ctx, off) else {
                    l4 = Some(PktCounter::MalformedL4);
                    break;
                };
                // SAFETY: `ptr_at` checked both bytes are inside the packet.
                let [nh, len] = unsafe { *ext };
                next = nh;
                off += (usize::from(len) + 1) * 8;
            }
            ipproto::FRAGMENT => {
                // Next header, reserved, offset (13 bits) and flags, identification. Only a
                // first fragment (offset 0) has the transport header, right after this one.
                let Some(h) = ptr_at::<[u8; 8]>(ctx, off) else {
                    l4 = Some(PktCounter::MalformedL4);
                    break;
                };
                // SAFETY: `ptr_at` checked the header is inside the packet.
                let h = unsafe { *h };
                next = h[0];
                off += 8;
                l4 = Some(if u16::from_be_bytes([h[2], h[3]]) >> 3 == 0 {
                    kind = frag::FIRST;
                    classify_l4(ctx, next, off, ip_end)
                } else {
                    kind = frag::LATER;
                    PktCounter::Fragment
                });
                break;
            }
            _ => {
                l4 = Some(classify_l4(ctx, next, off, ip_end));
                break;
            }
        }
    }
    let l4 = l4.unwrap_or(PktCounter::Ipv6ExtTooLong);
    let (src, dst) = (ip.src_addr, ip.dst_addr);
    let mut pkt = Parsed::ip(PktCounter::Ipv6, Some(l4), FAMILY_V6, next, off, src, dst);
    if kind != frag::NONE {
        pkt.mark_fragment(kind == frag::FIRST);
    }
    pkt.read_ports(ctx);
    pkt
}

/// Checks the transport header at `off` is complete (inside the packet and inside the IP
/// payload, which ends at `ip_end`) and names its counter.
#[inline(always)]
fn classify_l4<C: Frame>(ctx: &C, proto: u8, off: usize, ip_end: usize) -> PktCounter {
    let (counter, hlen) = match proto {
        ipproto::TCP => (PktCounter::Tcp, TcpHdr::LEN),
        ipproto::UDP => (PktCounter::Udp, UdpHdr::LEN),
        ipproto::ICMP => (PktCounter::Icmp, Icmpv4Hdr::LEN),
        ipproto::ICMPV6 => (PktCounter::Icmpv6, ICMPV6_HLEN),
        _ => return PktCounter::OtherL4,
    };
    if off + hlen > ip_end || ctx.data() + off + hlen > ctx.data_end() {
        return PktCounter::MalformedL4;
    }
    if proto == ipproto::TCP {
        let Some(tcp) = ptr_at::<TcpHdr>(ctx, off) else {
            return PktCounter::MalformedL4;
        };
        // SAFETY: `ptr_at` checked the header is inside the packet.
        let doff = usize::from(unsafe { (*tcp).doff() }) * 4;
        if doff < TcpHdr::LEN || off + doff > ip_end {
            return PktCounter::MalformedL4;
        }
    }
    counter
}
