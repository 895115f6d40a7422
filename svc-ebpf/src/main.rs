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
mod lb;
mod maps;
mod nat;
mod parse;
mod pod;
mod reject;
mod sock;
mod stats;

use aya_ebpf::{macros::classifier, programs::TcContext};

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
