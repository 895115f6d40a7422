//! `cargo xtask bench cluster`: the emulated cluster under a controller's load
//! (`tests/src/bin/svc-bench-cluster.rs`): N nodes in network namespaces, one `svc-agent` each
//! following the test API server, a load generator writing rollouts, HPA steps and Service
//! churn through the kube client, and client pods sending requests on every node. Prints a
//! Markdown table per node: network programming latency p50/p99, failed requests during
//! rollouts, agent CPU and peak RSS. `SVC_BENCH_NODES` (default 3, up to 10) and the other
//! `SVC_BENCH_*` variables of that binary shape the run.

use crate::{RELEASE_BINS, cargo, run_bin, step};

/// Builds the agent and the benchmark (release) and runs the benchmark.
pub fn run() -> anyhow::Result<()> {
    cargo(&RELEASE_BINS)?;
    step("bench cluster: emulated nodes, one svc-agent each, under a rollout/HPA/churn load");
    run_bin("svc-bench-cluster")
}
