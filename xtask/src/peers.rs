//! `cargo xtask bench peers`: kube-proxy's iptables and nftables datapaths and svc's, side by
//! side (`tests/src/bin/svc-bench-peers.rs`; what it measures is in the README's "Benchmarks:
//! kube-proxy side by side").
//!
//! Installs what is missing (nginx-light, wrk, iptables, nftables, conntrack), builds the agent
//! and the benchmark (release), and runs it; `MODES`, `SIZES`, `SKIP`, `REPS`, `DUR`, `PIN`, ...
//! pass through the environment. Results land in `target/bench/peers-<UTC>.{md,csv,raw.csv}`.

use crate::{RELEASE_BINS, cargo, run_bin, setup, step};

/// Runs the peers benchmark (the caller checked for root).
pub fn run() -> anyhow::Result<()> {
    setup::bench_tools()?;
    cargo(&RELEASE_BINS)?;
    step(
        "bench peers: client pod -> ClusterIP -> 3 nginx pods through no proxy, kube-proxy's \
         iptables and nftables rules, and svc (connect-time and TC), at 1 / 1,000 / 10,000 / \
         30,000 Services",
    );
    run_bin("svc-bench-peers")
}
