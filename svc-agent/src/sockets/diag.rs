//! `NETLINK_SOCK_DIAG` in the calling thread's network namespace: dumping the connected UDP
//! sockets of one family, and destroying one (`SOCK_DESTROY`, which for UDP makes the socket's
//! next or pending call fail with `ECONNABORTED` and disconnects it).
//!
//! Messages are built and read with `netlink-packet-sock-diag` (`inet_diag_req_v2` requests,
//! `inet_diag_msg` answers, `SockDiagDestroy` for the message type); framing and acks with
//! `netlink-packet-core`; the socket is `netlink-sys`'s. Only the fixed part of each answer is
//! read (its attributes are not needed), so an attribute the crate does not know cannot fail a
//! dump.
//!
//! A netlink socket acts in the namespace it was created in: open one per namespace, after
//! entering it.

use std::{io, num::NonZeroI32, os::fd::AsFd as _, time::Duration};

use anyhow::{Context as _, anyhow, bail};
use netlink_packet_core::{
    ErrorBuffer, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP,
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, Parseable as _,
};
use netlink_packet_sock_diag::{
    SOCK_DIAG_BY_FAMILY, SockDiagDestroy, SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_UDP},
    inet::{ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr as NlAddr, protocols::NETLINK_SOCK_DIAG};
use nix::sys::{
    socket::{setsockopt, sockopt::ReceiveTimeout},
    time::TimeVal,
};

use super::select::UdpSock;

/// Bytes read per `recv` (the kernel fills dump answers up to its own buffer size, 32 KiB).
const RECV_BUFFER: usize = 64 * 1024;
/// Size of `struct inet_diag_msg`, the fixed part of every answer.
const INET_DIAG_MSG_LEN: usize = 72;
/// A namespace's dump or a destroy's ack must come within this (it takes microseconds).
const RECV_TIMEOUT: Duration = Duration::from_secs(2);

/// `AF_INET` and `AF_INET6`, the families whose sockets the connect-time programs translate.
pub const FAMILIES: [u8; 2] = [AF_INET, AF_INET6];

/// A `NETLINK_SOCK_DIAG` socket in the namespace the calling thread was in when it opened it.
pub struct DiagSocket {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

/// What `SOCK_DESTROY` answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destroyed {
    /// The socket was destroyed.
    Yes,
    /// No socket with that tuple and cookie any more (closed, or disconnected, meanwhile).
    Gone,
}

impl DiagSocket {
    /// Opens one in the calling thread's network namespace.
    pub fn open() -> anyhow::Result<Self> {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG).context("socket(NETLINK_SOCK_DIAG)")?;
        socket.bind_auto().context("binding the sock_diag socket")?;
        socket
            .connect(&NlAddr::new(0, 0))
            .context("connecting the sock_diag socket")?;
        let timeout = TimeVal::new(i64::try_from(RECV_TIMEOUT.as_secs()).unwrap_or(2), 0);
        setsockopt(&socket.as_fd(), ReceiveTimeout, &timeout)
            .context("SO_RCVTIMEO on the sock_diag socket")?;
        Ok(Self {
            socket,
            seq: 0,
            buf: Vec::with_capacity(RECV_BUFFER),
        })
    }

    /// The connected UDP sockets of `family` in this namespace, at most `limit` of them (the
    /// second value says whether the dump held more).
    pub fn connected_udp(
        &mut self,
        family: u8,
        limit: usize,
    ) -> anyhow::Result<(Vec<UdpSock>, bool)> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        self.socket
            .send(&dump_request(family, seq), 0)
            .context("sending the UDP dump request")?;
        let mut out = Vec::new();
        let mut truncated = false;
        // Each recv brings at least one answer or the end; a dump of `limit` sockets needs at
        // most that many reads (bounded again by the receive timeout).
        for _ in 0..=limit.saturating_add(1) {
            self.recv().context("reading the UDP dump")?;
            for message in Messages::new(&self.buf) {
                let (kind, msg_seq, payload) = message?;
                if msg_seq != seq {
                    continue;
                }
                match kind {
                    NLMSG_DONE => return Ok((out, truncated)),
                    NLMSG_ERROR => {
                        return Err(error_code(payload)?.map_or_else(
                            || anyhow!("the UDP dump answered an ack instead of sockets"),
                            |code| anyhow!(os_error(code)).context("the UDP dump failed"),
                        ));
                    }
                    SOCK_DIAG_BY_FAMILY => {
                        if out.len() < limit {
                            out.push(parse_socket(payload)?);
                        } else {
                            truncated = true;
                        }
                    }
                    _ => {}
                }
            }
        }
        bail!("the UDP dump did not end within {limit} sockets' worth of reads")
    }

    /// Destroys `sock` (identified by its tuple and cookie, as the dump gave them).
    pub fn destroy(&mut self, family: u8, sock: &UdpSock) -> anyhow::Result<Destroyed> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        self.socket
            .send(&destroy_request(family, &sock.id, seq), 0)
            .context("sending SOCK_DESTROY")?;
        // The ack is the only answer; anything else (of another sequence) is skipped, a
        // bounded number of times.
        for _ in 0..4 {
            self.recv().context("reading the SOCK_DESTROY ack")?;
            for message in Messages::new(&self.buf) {
                let (kind, msg_seq, payload) = message?;
                if msg_seq != seq || kind != NLMSG_ERROR {
                    continue;
                }
                return match error_code(payload)? {
                    None => Ok(Destroyed::Yes),
                    Some(code) if -code.get() == nix::libc::ENOENT => Ok(Destroyed::Gone),
                    Some(code) => Err(anyhow!(os_error(code)).context("SOCK_DESTROY failed")),
                };
            }
        }
        bail!("no ack to SOCK_DESTROY")
    }

    fn recv(&mut self) -> io::Result<()> {
        self.buf.clear();
        loop {
            match self.socket.recv(&mut self.buf, 0) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// An errno from a netlink error code (negative).
fn os_error(code: NonZeroI32) -> io::Error {
    io::Error::from_raw_os_error(code.get().saturating_neg())
}

/// The code of an `NLMSG_ERROR` payload: `None` for an ack.
fn error_code(payload: &[u8]) -> anyhow::Result<Option<NonZeroI32>> {
    Ok(ErrorBuffer::new_checked(payload)
        .map_err(|e| anyhow!("{e}"))
        .context("malformed NLMSG_ERROR")?
        .code())
}

/// A dump request for the connected (`TCP_ESTABLISHED`, which is what a connected UDP socket
/// reports) UDP sockets of `family`.
#[must_use]
pub fn dump_request(family: u8, seq: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = seq;
    let id = if family == AF_INET6 {
        SocketId::new_v6()
    } else {
        SocketId::new_v4()
    };
    let mut message = NetlinkMessage::new(
        header,
        NetlinkPayload::InnerMessage(SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_UDP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::ESTABLISHED,
            socket_id: id,
        })),
    );
    serialize(&mut message)
}

/// A `SOCK_DESTROY` request (type 21, an `inet_diag_req_v2` naming one UDP socket of `family`
/// by its tuple and cookie; acked).
#[must_use]
pub fn destroy_request(family: u8, id: &SocketId, seq: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    header.sequence_number = seq;
    let mut message = NetlinkMessage::new(
        header,
        NetlinkPayload::InnerMessage(SockDiagDestroy::new(SockDiagMessage::InetRequest(
            InetRequest {
                family,
                protocol: IPPROTO_UDP,
                extensions: ExtensionFlags::empty(),
                states: StateFlags::ESTABLISHED,
                socket_id: id.clone(),
            },
        ))),
    );
    serialize(&mut message)
}

fn serialize<I: netlink_packet_core::NetlinkSerializable>(
    message: &mut NetlinkMessage<I>,
) -> Vec<u8> {
    message.finalize();
    let mut buf = vec![0; message.buffer_len()];
    message.serialize(&mut buf);
    buf
}

/// A socket's cookie from the two 32-bit halves `sock_diag` writes (`idiag_cookie[0]` the low
/// half, each in host order).
#[must_use]
pub fn cookie_of(raw: [u8; 8]) -> u64 {
    let low = u32::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let high = u32::from_ne_bytes([raw[4], raw[5], raw[6], raw[7]]);
    u64::from(low) | (u64::from(high) << 32)
}

/// One `inet_diag_msg` as a [`UdpSock`].
fn parse_socket(payload: &[u8]) -> anyhow::Result<UdpSock> {
    let fixed = payload
        .get(..INET_DIAG_MSG_LEN)
        .ok_or_else(|| anyhow!("inet_diag_msg of {} bytes", payload.len()))?;
    let header = InetResponseHeader::parse(fixed)
        .map_err(|e| anyhow!("{e}"))
        .context("malformed inet_diag_msg")?;
    let id = header.socket_id;
    Ok(UdpSock {
        cookie: cookie_of(id.cookie),
        local: std::net::SocketAddr::new(id.source_address, id.source_port),
        peer: std::net::SocketAddr::new(id.destination_address, id.destination_port),
        id,
    })
}

/// The netlink messages of one `recv`: `(type, sequence, payload)` each.
struct Messages<'a> {
    buf: &'a [u8],
}

impl<'a> Messages<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = anyhow::Result<(u16, u32, &'a [u8])>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            return None;
        }
        let message = match NetlinkBuffer::new_checked(self.buf) {
            Ok(m) => m,
            Err(e) => {
                self.buf = &[];
                return Some(Err(anyhow!("malformed netlink message: {e}")));
            }
        };
        // Messages are 4-byte aligned.
        let len = (message.length() as usize).next_multiple_of(4);
        let item = (
            message.message_type(),
            message.sequence_number(),
            message.payload(),
        );
        self.buf = self.buf.get(len..).unwrap_or_default();
        if item.0 == NLMSG_NOOP {
            return self.next();
        }
        Some(Ok(item))
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv6Addr};

    use super::*;

    fn id_v4() -> SocketId {
        SocketId {
            source_port: 40000,
            destination_port: 5353,
            source_address: "198.18.1.10".parse().unwrap(),
            destination_address: "198.18.2.11".parse().unwrap(),
            interface_id: 3,
            cookie: 0x1122_3344_5566_7788_u64.to_le_bytes(),
        }
    }

    #[test]
    fn destroy_request_layout_is_nlmsghdr_then_inet_diag_req_v2() {
        let buf = destroy_request(AF_INET, &id_v4(), 7);
        // struct nlmsghdr (16 bytes) + struct inet_diag_req_v2 (56 bytes).
        assert_eq!(buf.len(), 72);
        assert_eq!(
            u32::from_ne_bytes(buf[0..4].try_into().unwrap()),
            72,
            "nlmsg_len"
        );
        assert_eq!(u16::from_ne_bytes([buf[4], buf[5]]), 21, "SOCK_DESTROY");
        assert_eq!(
            u16::from_ne_bytes([buf[6], buf[7]]),
            NLM_F_REQUEST | NLM_F_ACK
        );
        assert_eq!(u32::from_ne_bytes(buf[8..12].try_into().unwrap()), 7, "seq");
        let req = &buf[16..];
        assert_eq!(
            (req[0], req[1], req[2], req[3]),
            (AF_INET, IPPROTO_UDP, 0, 0),
            "family, protocol, ext, pad"
        );
        assert_eq!(
            u32::from_ne_bytes(req[4..8].try_into().unwrap()),
            1 << 1,
            "states"
        );
        // struct inet_diag_sockid at 8: ports big-endian, addresses 16 bytes, if, cookie.
        assert_eq!(&req[8..10], &40000u16.to_be_bytes(), "idiag_sport");
        assert_eq!(&req[10..12], &5353u16.to_be_bytes(), "idiag_dport");
        assert_eq!(&req[12..16], &[198, 18, 1, 10], "idiag_src");
        assert_eq!(&req[16..28], &[0; 12]);
        assert_eq!(&req[28..32], &[198, 18, 2, 11], "idiag_dst");
        assert_eq!(&req[32..44], &[0; 12]);
        assert_eq!(
            u32::from_ne_bytes(req[44..48].try_into().unwrap()),
            3,
            "idiag_if"
        );
        assert_eq!(
            &req[48..56],
            &0x1122_3344_5566_7788_u64.to_le_bytes(),
            "idiag_cookie as the dump gave it"
        );
    }

    #[test]
    fn dump_request_asks_for_connected_udp_sockets_of_one_family() {
        let buf = dump_request(AF_INET6, 9);
        assert_eq!(buf.len(), 72);
        assert_eq!(u16::from_ne_bytes([buf[4], buf[5]]), SOCK_DIAG_BY_FAMILY);
        assert_eq!(
            u16::from_ne_bytes([buf[6], buf[7]]),
            NLM_F_REQUEST | NLM_F_DUMP
        );
        assert_eq!((buf[16], buf[17]), (AF_INET6, IPPROTO_UDP));
        assert_eq!(u32::from_ne_bytes(buf[20..24].try_into().unwrap()), 1 << 1);
        assert!(buf[24..].iter().all(|b| *b == 0), "no tuple, no cookie");
    }

    /// An answer as the kernel writes it: `nlmsghdr` + `inet_diag_msg` + one attribute.
    fn answer(seq: u32, family: u8, src: IpAddr, dst: IpAddr, cookie: u64) -> Vec<u8> {
        let mut msg = vec![family, 1, 0, 0];
        msg.extend_from_slice(&40001u16.to_be_bytes());
        msg.extend_from_slice(&53u16.to_be_bytes());
        for ip in [src, dst] {
            let mut a = [0u8; 16];
            match ip {
                IpAddr::V4(v4) => a[..4].copy_from_slice(&v4.octets()),
                IpAddr::V6(v6) => a.copy_from_slice(&v6.octets()),
            }
            msg.extend_from_slice(&a);
        }
        msg.extend_from_slice(&0u32.to_ne_bytes()); // idiag_if
        let (low, high) = (cookie as u32, (cookie >> 32) as u32);
        msg.extend_from_slice(&low.to_ne_bytes());
        msg.extend_from_slice(&high.to_ne_bytes());
        msg.extend_from_slice(&[0; 20]); // expires, rqueue, wqueue, uid, inode
        assert_eq!(msg.len(), INET_DIAG_MSG_LEN);
        // INET_DIAG_SHUTDOWN (u8), padded.
        msg.extend_from_slice(&[5, 0, 8, 0, 0, 0, 0, 0]);
        let mut out = Vec::new();
        out.extend_from_slice(&(16 + u32::try_from(msg.len()).unwrap()).to_ne_bytes());
        out.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        out.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(&msg);
        out
    }

    #[test]
    fn answers_parse_into_sockets_with_their_cookie_and_peer() {
        let v6: Ipv6Addr = "2001:db8:2::11".parse().unwrap();
        let mut buf = answer(
            3,
            AF_INET6,
            "2001:db8:1::10".parse().unwrap(),
            v6.into(),
            0xdead_beef_0000_0001,
        );
        buf.extend(answer(
            3,
            AF_INET,
            "198.18.1.10".parse().unwrap(),
            "198.18.2.11".parse().unwrap(),
            5,
        ));
        let messages: Vec<_> = Messages::new(&buf).collect::<Result<_, _>>().unwrap();
        assert_eq!(messages.len(), 2);
        let first = parse_socket(messages[0].2).unwrap();
        assert_eq!(first.cookie, 0xdead_beef_0000_0001);
        assert_eq!(first.peer, "[2001:db8:2::11]:53".parse().unwrap());
        assert_eq!(first.local, "[2001:db8:1::10]:40001".parse().unwrap());
        let second = parse_socket(messages[1].2).unwrap();
        assert_eq!(
            (second.cookie, second.peer),
            (5, "198.18.2.11:53".parse().unwrap())
        );
        // The destroy request carries the cookie back exactly as it came.
        let req = destroy_request(AF_INET, &second.id, 1);
        assert_eq!(cookie_of(req[64..72].try_into().unwrap()), 5);
        assert!(
            parse_socket(&messages[0].2[..40]).is_err(),
            "short answers are refused"
        );
    }

    #[test]
    fn cookie_halves_are_low_then_high() {
        let mut raw = [0u8; 8];
        raw[..4].copy_from_slice(&0x0000_0002_u32.to_ne_bytes());
        raw[4..].copy_from_slice(&0x0000_0001_u32.to_ne_bytes());
        assert_eq!(cookie_of(raw), 0x1_0000_0002);
    }

    #[test]
    fn error_payloads_give_their_code_and_acks_none() {
        let ack = [0u8; 20];
        assert_eq!(error_code(&ack).unwrap(), None);
        let mut nack = [0u8; 20];
        nack[..4].copy_from_slice(&(-nix::libc::ENOENT).to_ne_bytes());
        assert_eq!(
            error_code(&nack).unwrap().map(NonZeroI32::get),
            Some(-nix::libc::ENOENT)
        );
        assert!(error_code(&[0u8; 2]).is_err());
    }
}
