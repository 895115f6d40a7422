//! Building test frames (with the `etherparse` crate, checksums included) and describing frames
//! for humans (addresses, ports, flags, and whether each checksum is right).

use std::net::IpAddr;

use etherparse::{LaxNetSlice, LaxSlicedPacket, PacketBuilder, TransportSlice};
use svc_common::csum;

/// MAC address used as the source of test frames (a pod's eth0).
pub const POD_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
/// MAC address used as the destination of test frames (the host end of the pod's veth).
pub const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];
/// TTL / hop limit of built frames.
pub const TTL: u8 = 64;

/// A transport 4-tuple.
#[derive(Clone, Copy, Debug)]
pub struct Flow {
    /// Source address.
    pub src: IpAddr,
    /// Source port (or ICMP echo id).
    pub sport: u16,
    /// Destination address.
    pub dst: IpAddr,
    /// Destination port.
    pub dport: u16,
}

impl Flow {
    /// A flow from `src:sport` to `dst:dport`; both addresses must be of one family.
    ///
    /// # Panics
    /// On an address that does not parse (test inputs are literals).
    #[must_use]
    pub fn new(src: &str, sport: u16, dst: &str, dport: u16) -> Self {
        Self {
            src: src.parse().expect("test address"),
            sport,
            dst: dst.parse().expect("test address"),
            dport,
        }
    }

    /// The same flow seen from the other end.
    #[must_use]
    pub fn reversed(self) -> Self {
        Self {
            src: self.dst,
            sport: self.dport,
            dst: self.src,
            dport: self.sport,
        }
    }

    fn ip(self) -> etherparse::PacketBuilderStep<etherparse::IpHeaders> {
        let eth = PacketBuilder::ethernet2(POD_MAC, HOST_MAC);
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), TTL),
            (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), TTL),
            _ => panic!("test flow mixes address families: {self:?}"),
        }
    }
}

/// TCP flags for [`tcp`].
#[derive(Clone, Copy, Debug, Default)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "one field per TCP flag reads best in fixture rows"
)]
pub struct TcpFlags {
    /// SYN.
    pub syn: bool,
    /// ACK (with this acknowledgment number).
    pub ack: Option<u32>,
    /// FIN.
    pub fin: bool,
    /// RST.
    pub rst: bool,
    /// PSH.
    pub psh: bool,
}

/// A SYN.
pub const SYN: TcpFlags = TcpFlags {
    syn: true,
    ack: None,
    fin: false,
    rst: false,
    psh: false,
};

/// An Ethernet/IP/TCP frame with sequence number 1000 and window 64240.
#[must_use]
pub fn tcp(flow: Flow, flags: TcpFlags, payload: &[u8]) -> Vec<u8> {
    let mut b = flow.ip().tcp(flow.sport, flow.dport, 1000, 64240);
    if flags.syn {
        b = b.syn();
    }
    if let Some(ack) = flags.ack {
        b = b.ack(ack);
    }
    if flags.fin {
        b = b.fin();
    }
    if flags.rst {
        b = b.rst();
    }
    if flags.psh {
        b = b.psh();
    }
    write(b.size(payload.len()), |v| b.write(v, payload))
}

/// An Ethernet/IP/TCP frame carrying TCP options (MSS, SACK permitted, window scale).
///
/// # Panics
/// Never for these fixed options (they fit the header).
#[must_use]
pub fn tcp_with_options(flow: Flow) -> Vec<u8> {
    use etherparse::TcpOptionElement::{
        MaximumSegmentSize, Noop, SelectiveAcknowledgementPermitted, WindowScale,
    };
    let b = flow
        .ip()
        .tcp(flow.sport, flow.dport, 1000, 64240)
        .syn()
        .options(&[
            MaximumSegmentSize(1460),
            SelectiveAcknowledgementPermitted,
            Noop,
            WindowScale(7),
        ])
        .expect("options fit");
    write(b.size(0), |v| b.write(v, &[]))
}

/// An Ethernet/IP/UDP frame.
#[must_use]
pub fn udp(flow: Flow, payload: &[u8]) -> Vec<u8> {
    let b = flow.ip().udp(flow.sport, flow.dport);
    write(b.size(payload.len()), |v| b.write(v, payload))
}

/// An ICMP (v4) or `ICMPv6` echo request from `flow.src` to `flow.dst`, id `flow.sport`.
#[must_use]
pub fn echo_request(flow: Flow, seq: u16) -> Vec<u8> {
    let payload = b"svc-ping";
    if flow.src.is_ipv4() {
        let b = flow.ip().icmpv4_echo_request(flow.sport, seq);
        write(b.size(payload.len()), |v| b.write(v, payload))
    } else {
        let b = flow.ip().icmpv6_echo_request(flow.sport, seq);
        write(b.size(payload.len()), |v| b.write(v, payload))
    }
}

/// An IPv4 frame with an arbitrary protocol number and payload.
///
/// # Panics
/// When `flow` is not IPv4.
#[must_use]
pub fn ipv4_raw(flow: Flow, proto: u8, payload: &[u8]) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (flow.src, flow.dst) else {
        panic!("ipv4_raw needs IPv4")
    };
    let mut ip = etherparse::Ipv4Header::new(
        payload.len() as u16,
        TTL,
        proto.into(),
        s.octets(),
        d.octets(),
    )
    .expect("ipv4 header");
    ip.header_checksum = ip.calc_header_checksum();
    let mut v = ethernet_header(0x0800);
    ip.write(&mut v).expect("write");
    v.extend_from_slice(payload);
    v
}

/// An ARP request (a frame that is not IP at all).
#[must_use]
pub fn arp_request(sender: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let mut v = ethernet_header(0x0806);
    v.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    v.extend_from_slice(&POD_MAC);
    v.extend_from_slice(&sender);
    v.extend_from_slice(&[0; 6]);
    v.extend_from_slice(&target);
    v
}

/// An Ethernet header with the test MACs and the given `EtherType`.
#[must_use]
pub fn ethernet_header(ether_type: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(64);
    v.extend_from_slice(&HOST_MAC);
    v.extend_from_slice(&POD_MAC);
    v.extend_from_slice(&ether_type.to_be_bytes());
    v
}

/// Recomputes the IPv4 header checksum of a frame (after a test edited the header).
pub fn fix_ipv4_checksum(frame: &mut [u8]) {
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    frame[24] = 0;
    frame[25] = 0;
    // A header cut short by the test is summed as far as it goes.
    let end = (14 + ihl).min(frame.len());
    let c = csum::checksum(&frame[14..end]);
    frame[24..26].copy_from_slice(&c.to_ne_bytes());
}

fn write(
    size: usize,
    f: impl FnOnce(&mut Vec<u8>) -> Result<(), etherparse::err::packet::BuildWriteError>,
) -> Vec<u8> {
    let mut v = Vec::with_capacity(size);
    f(&mut v).expect("building a test frame");
    v
}

/// One line describing a frame: link, network and transport headers with checksum validity.
#[must_use]
pub fn describe(frame: &[u8]) -> String {
    let Ok(p) = LaxSlicedPacket::from_ethernet(frame) else {
        return format!("<not even an Ethernet header: {} bytes>", frame.len());
    };
    let mut parts = Vec::new();
    if let Some(etherparse::LinkSlice::Ethernet2(e)) = &p.link {
        parts.push(format!(
            "eth {:02x?}->{:02x?} type {:#06x}",
            e.source(),
            e.destination(),
            e.ether_type().0
        ));
    }
    let mut pseudo: Option<u32> = None;
    match &p.net {
        Some(LaxNetSlice::Ipv4(ip)) => {
            let h = ip.header();
            let ok = csum::checksum(h.slice()) == 0;
            parts.push(format!(
                "ipv4 {}->{} ihl {} len {} ttl {} proto {} frag {:#06x} csum {:#06x} ({})",
                h.source_addr(),
                h.destination_addr(),
                h.ihl(),
                h.total_len(),
                h.ttl(),
                h.protocol().0,
                u16::from_be_bytes([h.slice()[6], h.slice()[7]]),
                h.header_checksum(),
                if ok { "ok" } else { "BAD" }
            ));
            let pl = ip.payload();
            let mut s = csum::sum_bytes(0, &h.slice()[12..20]);
            s = csum::sum_bytes(s, &[0, pl.ip_number.0]);
            s = csum::sum_bytes(s, &(pl.payload.len() as u16).to_be_bytes());
            pseudo = Some(s);
        }
        Some(LaxNetSlice::Ipv6(ip)) => {
            let h = ip.header();
            parts.push(format!(
                "ipv6 {}->{} plen {} next {} hlim {}",
                h.source_addr(),
                h.destination_addr(),
                h.payload_length(),
                h.next_header().0,
                h.hop_limit()
            ));
            let pl = ip.payload();
            let mut s = csum::sum_bytes(0, &h.slice()[8..40]);
            s = csum::sum_bytes(s, &(pl.payload.len() as u32).to_be_bytes());
            s = csum::sum_bytes(s, &[0, 0, 0, pl.ip_number.0]);
            pseudo = Some(s);
        }
        Some(LaxNetSlice::Arp(_)) => parts.push("arp".to_owned()),
        None => {}
    }
    parts.extend(describe_transport(&p, pseudo));
    if let Some((err, layer)) = &p.stop_err {
        parts.push(format!("<stopped at {layer:?}: {err}>"));
    }
    parts.join(" | ")
}

/// The transport part of [`describe`]; `pseudo` is the pseudo-header sum of the IP layer.
fn describe_transport(p: &LaxSlicedPacket<'_>, pseudo: Option<u32>) -> Option<String> {
    let l4_ok = |seg: &[u8], with_pseudo: bool| -> &'static str {
        let s = if with_pseudo { pseudo.unwrap_or(0) } else { 0 };
        if csum::finish(csum::sum_bytes(s, seg)) == 0 {
            "ok"
        } else {
            "BAD"
        }
    };
    Some(match p.transport.as_ref()? {
        TransportSlice::Tcp(t) => format!(
            "tcp {}->{} [{}{}{}{}{}] seq {} ack {} csum {:#06x} ({}) payload {}",
            t.source_port(),
            t.destination_port(),
            if t.syn() { "S" } else { "" },
            if t.ack() { "A" } else { "" },
            if t.fin() { "F" } else { "" },
            if t.rst() { "R" } else { "" },
            if t.psh() { "P" } else { "" },
            t.sequence_number(),
            t.acknowledgment_number(),
            t.checksum(),
            l4_ok(t.slice(), true),
            t.payload().len()
        ),
        TransportSlice::Udp(u) => format!(
            "udp {}->{} len {} csum {:#06x} ({}) payload {}",
            u.source_port(),
            u.destination_port(),
            u.length(),
            u.checksum(),
            if u.checksum() == 0 && matches!(p.net, Some(LaxNetSlice::Ipv4(_))) {
                "none"
            } else {
                l4_ok(u.slice(), true)
            },
            u.payload().len()
        ),
        TransportSlice::Icmpv4(i) => format!(
            "icmp type {} code {} csum {:#06x} ({})",
            i.type_u8(),
            i.code_u8(),
            i.checksum(),
            l4_ok(i.slice(), false)
        ),
        TransportSlice::Icmpv6(i) => format!(
            "icmpv6 type {} code {} csum {:#06x} ({})",
            i.type_u8(),
            i.code_u8(),
            i.checksum(),
            l4_ok(i.slice(), true)
        ),
    })
}

/// Builder of a frame sent by the host end of the veth towards the pod (MACs reversed).
fn to_pod_ip(flow: Flow) -> etherparse::PacketBuilderStep<etherparse::IpHeaders> {
    let eth = PacketBuilder::ethernet2(HOST_MAC, POD_MAC);
    match (flow.src, flow.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), TTL),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), TTL),
        _ => panic!("test flow mixes address families: {flow:?}"),
    }
}

/// A TCP reset sent to the pod: window 0, no options; `ack` sets the ACK flag and number.
///
/// # Panics
/// When the flow mixes address families.
#[must_use]
pub fn reset_to_pod(flow: Flow, seq: u32, ack: Option<u32>) -> Vec<u8> {
    let mut b = to_pod_ip(flow).tcp(flow.sport, flow.dport, seq, 0).rst();
    if let Some(a) = ack {
        b = b.ack(a);
    }
    write(b.size(0), |v| b.write(v, &[]))
}

/// An ICMP (v4: type 3 code 3) or `ICMPv6` (type 1 code 4) port unreachable sent to the pod,
/// from `from` to `to`, quoting `quote`.
///
/// # Panics
/// When the addresses mix families.
#[must_use]
pub fn port_unreachable_to_pod(from: &str, to: &str, quote: &[u8]) -> Vec<u8> {
    let flow = Flow::new(from, 0, to, 0);
    if flow.src.is_ipv4() {
        let b = to_pod_ip(flow).icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::Port,
        ));
        write(b.size(quote.len()), |v| b.write(v, quote))
    } else {
        let b = to_pod_ip(flow).icmpv6(etherparse::Icmpv6Type::DestinationUnreachable(
            etherparse::icmpv6::DestUnreachableCode::Port,
        ));
        write(b.size(quote.len()), |v| b.write(v, quote))
    }
}

/// An ICMP "fragmentation needed" (type 3 code 4, next-hop MTU `mtu`) sent to the pod, from
/// `from` to `to`, quoting `quote`.
///
/// # Panics
/// When the addresses are not IPv4.
#[must_use]
pub fn frag_needed_to_pod(from: &str, to: &str, mtu: u16, quote: &[u8]) -> Vec<u8> {
    let flow = Flow::new(from, 0, to, 0);
    let b = to_pod_ip(flow).icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
        etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu },
    ));
    write(b.size(quote.len()), |v| b.write(v, quote))
}

/// The same frame with its Ethernet source and destination swapped (a frame the host sends
/// back to the pod it came from).
#[must_use]
pub fn swap_macs(mut frame: Vec<u8>) -> Vec<u8> {
    let (dst, rest) = frame.split_at_mut(6);
    dst.swap_with_slice(&mut rest[..6]);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_have_valid_checksums() {
        let f4 = Flow::new("198.18.1.10", 40000, "198.19.0.10", 80);
        let f6 = Flow::new("2001:db8:1::10", 40000, "2001:db8:f::10", 80);
        for frame in [
            tcp(f4, SYN, b"x"),
            udp(f4, b"hello"),
            echo_request(f4, 1),
            tcp(f6, SYN, b""),
            udp(f6, b"y"),
            echo_request(f6, 2),
        ] {
            let d = describe(&frame);
            assert!(!d.contains("BAD"), "{d}");
            assert!(d.contains("(ok)"), "{d}");
        }
    }

    #[test]
    fn describe_flags_a_bad_checksum() {
        let mut frame = udp(Flow::new("198.18.1.10", 1, "198.18.2.10", 2), b"abc");
        let n = frame.len();
        frame[n - 1] ^= 0xff;
        assert!(describe(&frame).contains("BAD"));
    }
}
