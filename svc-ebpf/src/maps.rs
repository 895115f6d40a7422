//! Every map the kernel programs use. Layouts live in `svc-common`; each map's comment says who
//! writes it, its key and value, and their byte order. Names carry the layout version (`_V1`).

use aya_ebpf::{macros::map, maps::PerCpuArray};
use svc_common::stats::{Counter, PktCounter};

/// Parser counters. Written by every program (per CPU); read by `svc-agent inspect stats`.
/// Key: `u32` [`PktCounter`] index. Value: [`Counter`] (host byte order).
#[map]
pub static PKT_STATS_V1: PerCpuArray<Counter> = PerCpuArray::with_max_entries(PktCounter::COUNT, 0);
