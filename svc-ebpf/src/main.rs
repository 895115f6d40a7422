//! svc kernel programs. This file holds only the entry points; each one hands its context to
//! the module that tells the packet's story (see the README's packet-path picture).
#![no_std]
#![no_main]
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys go by reference: copies of 24-40 byte keys would eat the 512-byte stack"
)]
#![expect(
    clippy::inline_always,
    reason = "packet pointers are verified best when every helper is inlined into its program"
)]
#![expect(
    missing_docs,
    reason = "aya's program macros generate undocumented wrapper functions"
)]

mod conntrack;
mod frag;
mod frame;
mod icmp;
mod lb;
mod maps;
mod nat;
mod parse;
mod pod;
mod reject;
mod sock;
mod stats;
mod world;
mod xdp;

use aya_ebpf::{
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

/// TC ingress on a pod-facing interface (the host end of a pod's veth): packets *from* a pod.
#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the classifier macro fixes the signature"
)]
pub fn svc_tc_from_pod(ctx: TcContext) -> i32 {
    pod::from_pod(&ctx)
}

/// TC egress on a pod-facing interface: packets *to* a pod (replies get the service address
/// back as their source).
#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the classifier macro fixes the signature"
)]
pub fn svc_tc_to_pod(ctx: TcContext) -> i32 {
    pod::to_pod(&ctx)
}

/// TC ingress on a node-facing interface: packets from the outside world (`NodePort`, external
/// and load-balancer addresses; replies to SNAT'd flows).
#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the classifier macro fixes the signature"
)]
pub fn svc_tc_from_world(ctx: TcContext) -> i32 {
    world::from_world(&ctx)
}

/// TC egress on a node-facing interface: replies of local endpoints to external clients get
/// the frontend address back as their source.
#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the classifier macro fixes the signature"
)]
pub fn svc_tc_to_world(ctx: TcContext) -> i32 {
    world::to_world(&ctx)
}

/// XDP on a node-facing interface (`--xdp native|generic`): `NodePort`, external and
/// load-balancer traffic to other nodes' endpoints translated and sent back out before the
/// stack sees it; the rest handed to `svc_tc_from_world` (with its decision, when it has one).
#[xdp]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the xdp macro fixes the signature"
)]
pub fn svc_xdp_from_world(ctx: XdpContext) -> u32 {
    xdp::from_world(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach a real panic; this is never run.
    loop {}
}

/// The kernel only lets GPL-compatible programs call some helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

// Connect-time translation for sockets in the cgroup the agent attaches these to (see
// sock.rs): connect and sendto name a backend instead of a service address; getpeername and
// recvfrom report the service address again.
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

/// `connect()` of an IPv4 socket: a service address becomes one of its backends.
#[cgroup_sock_addr(connect4)]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the cgroup_sock_addr macro fixes the signature"
)]
pub fn svc_sock_conn4(ctx: SockAddrContext) -> i32 {
    sock::sock4_forward(&ctx)
}

/// `connect()` of an IPv6 socket: a service address becomes one of its backends.
#[cgroup_sock_addr(connect6)]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the cgroup_sock_addr macro fixes the signature"
)]
pub fn svc_sock_conn6(ctx: SockAddrContext) -> i32 {
    sock::sock6_forward(&ctx)
}

/// `sendto()`/`sendmsg()` with an address on an IPv4 UDP socket: as `connect()`, per datagram.
#[cgroup_sock_addr(sendmsg4)]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the cgroup_sock_addr macro fixes the signature"
)]
pub fn svc_sock_send4(ctx: SockAddrContext) -> i32 {
    sock::sock4_forward(&ctx)
}

/// `sendto()`/`sendmsg()` with an address on an IPv6 UDP socket: as `connect()`, per datagram.
#[cgroup_sock_addr(sendmsg6)]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the cgroup_sock_addr macro fixes the signature"
)]
pub fn svc_sock_send6(ctx: SockAddrContext) -> i32 {
    sock::sock6_forward(&ctx)
}

/// `recvfrom()`/`recvmsg()` on an IPv4 UDP socket: a backend sender is shown as the service.
#[cgroup_sock_addr(recvmsg4)]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the cgroup_sock_addr macro fixes the signature"
)]
pub fn svc_sock_recv4(ctx: SockAddrContext) -> i32 {
    sock::sock4_reverse(&ctx)
}

/// `recvfrom()`/`recvmsg()` on an IPv6 UDP socket: a backend sender is shown as the service.
#[cgroup_sock_addr(recvmsg6)]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the cgroup_sock_addr macro fixes the signature"
)]
pub fn svc_sock_recv6(ctx: SockAddrContext) -> i32 {
    sock::sock6_reverse(&ctx)
}

/// `getpeername()` of an IPv4 socket: a backend peer is shown as the service.
#[cgroup_sock_addr(getpeername4)]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the cgroup_sock_addr macro fixes the signature"
)]
pub fn svc_sock_peer4(ctx: SockAddrContext) -> i32 {
    sock::sock4_reverse(&ctx)
}

/// `getpeername()` of an IPv6 socket: a backend peer is shown as the service.
#[cgroup_sock_addr(getpeername6)]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the cgroup_sock_addr macro fixes the signature"
)]
pub fn svc_sock_peer6(ctx: SockAddrContext) -> i32 {
    sock::sock6_reverse(&ctx)
}
