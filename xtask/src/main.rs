//! Project tasks: `cargo xtask setup | build | test | demo | lint | bench | kind`.
//!
//! Every task that needs the eBPF toolchain runs `setup` first; `setup` is idempotent and takes
//! well under a second when everything is already installed.

mod cluster;
mod kind;
mod peers;
mod setup;

use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "svc project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing: Debian's eBPF compiler and bpfel core, LLVM, bpf-linker, test tools.
    Setup,
    /// Build the eBPF programs and the agent (release).
    Build,
    /// Run every test tier: lint, host unit tests, packet fixtures, network-namespace end to end.
    Test {
        /// Skip rustfmt and clippy.
        #[arg(long)]
        no_lint: bool,
    },
    /// rustfmt check and clippy (warnings are errors).
    Lint,
    /// The demo: two emulated nodes in network namespaces, real traffic, live counters.
    Demo,
    /// Benchmarks that print figures: the packet path's cost with 1 and 100,000 Services, and
    /// the control plane's table (`svc-bench-sync`: change latency, cold sync, memory, burst and
    /// churn CPU at 1k/10k/30k/100k Services, following the API server and a directory; the
    /// `SVC_BENCH_*` variables narrow it, see the README).
    Bench {
        /// One benchmark instead of today's set.
        #[command(subcommand)]
        what: Option<BenchWhat>,
    },
    /// kind clusters (needs Docker, kind and kubectl): `up`, `bench`, `down`.
    Kind {
        #[command(subcommand)]
        action: kind::Action,
    },
}

/// The benchmarks `cargo xtask bench` can run alone.
#[derive(Subcommand)]
enum BenchWhat {
    /// Emulated nodes (netns, one agent each) under rollouts, HPA steps and Service churn:
    /// programming latency per node, failed requests, agent CPU and memory.
    Cluster,
    /// kube-proxy's iptables and nftables rules and svc side by side (client pod -> `ClusterIP`
    /// -> 3 nginx pods at 1 / 1,000 / 10,000 / 30,000 Services; `MODES`, `SIZES`, `REPS`,
    /// `DUR`, ... narrow it, see the README).
    Peers,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Build => {
            setup::run()?;
            cargo(&["build", "--release", "-p", "svc-agent"])
        }
        Task::Lint => {
            setup::run()?;
            lint()
        }
        Task::Test { no_lint } => {
            setup::run()?;
            test(no_lint)
        }
        Task::Bench { what } => {
            setup::run()?;
            require_root("the benchmarks load eBPF programs and create network namespaces")?;
            match what {
                None => bench(),
                Some(BenchWhat::Cluster) => cluster::run(),
                Some(BenchWhat::Peers) => peers::run(),
            }
        }
        Task::Kind { action } => kind::run(&action),
        Task::Demo => {
            setup::run()?;
            require_root("the demo creates network namespaces and loads eBPF programs")?;
            cargo(&RELEASE_BINS)?;
            run_bin("svc-demo")
        }
    }
}

/// Runs the release build of `svc-tests`' binary `name` (built by [`RELEASE_BINS`]).
fn run_bin(name: &str) -> anyhow::Result<()> {
    cargo(&[
        "run",
        "--quiet",
        "--release",
        "-p",
        "svc-tests",
        "--bin",
        name,
    ])
}

/// Builds the agent and the demo/benchmark binaries (release).
const RELEASE_BINS: [&str; 7] = [
    "build",
    "--release",
    "-p",
    "svc-agent",
    "-p",
    "svc-tests",
    "--bins",
];

fn lint() -> anyhow::Result<()> {
    step("lint: rustfmt");
    cargo(&["fmt", "--all", "--check"])?;
    // The kernel crate only builds for bpfel-unknown-none; it gets its own clippy run below.
    step("lint: clippy (userspace; warnings are errors)");
    cargo(&[
        "clippy",
        "--workspace",
        "--exclude",
        "svc-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    step("lint: clippy (kernel programs, on bpfel-unknown-none with Debian's clippy)");
    let status = Command::new("rustup")
        .args(["run", "debian", "cargo", "clippy", "-p", "svc-ebpf"])
        .args(["--target", "bpfel-unknown-none", "--release"])
        .args(["--target-dir", "target/ebpf-clippy", "--", "-D", "warnings"])
        .env("RUSTC_BOOTSTRAP", "aya_ebpf")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "--cfg=bpf_target_arch=\"x86_64\"",
        )
        .env_remove("RUSTC")
        .env_remove("CARGO")
        .current_dir(workspace_root())
        .status()
        .context("running Debian's clippy on svc-ebpf")?;
    if !status.success() {
        bail!("clippy found problems in svc-ebpf ({status})");
    }
    Ok(())
}

fn test(no_lint: bool) -> anyhow::Result<()> {
    if !no_lint {
        lint()?;
    }
    step("tier 1: host unit tests (no root)");
    cargo(&[
        "test",
        "--workspace",
        "--exclude",
        "svc-ebpf",
        "--lib",
        "--bins",
    ])?;
    step("tier 1: the agent binary's log formats (no root)");
    cargo(&["test", "-p", "svc-agent", "--test", "log_format"])?;
    step(
        "tier 1: the test API server with the real kube client; the load generator through it; \
         deployment manifests",
    );
    cargo(&[
        "test",
        "-p",
        "svc-tests",
        "--test",
        "apiserver",
        "--test",
        "manifests",
        "--test",
        "loadgen",
    ])?;
    require_root(
        "tiers 2 and 3 load eBPF programs (BPF_PROG_TEST_RUN) and create network namespaces",
    )?;
    step("tier 2: packet fixtures through BPF_PROG_TEST_RUN");
    cargo(&["test", "-p", "svc-tests", "--test", "fixtures"])?;
    cargo(&["build", "-p", "svc-agent"])?;
    // Every end-to-end case runs in both configurations: pods translated at the socket (the
    // shipped default) and per packet by the TC programs (`--socket-lb host-only`).
    for mode in ["all", "host-only"] {
        step(&format!(
            "tier 3: network-namespace end to end (the real svc-agent binary per emulated node), \
             --socket-lb {mode}"
        ));
        cargo_env(
            &[
                "test",
                "-p",
                "svc-tests",
                "--test",
                "*_e2e",
                "--",
                "--test-threads=1",
            ],
            &[("SVC_TEST_SOCKET_LB", mode)],
        )?;
    }
    // The north-south cases again with the XDP program on the uplinks (`--xdp`), in both
    // attach modes: XDP and TC together must serve exactly what TC alone does.
    for xdp in ["generic", "native"] {
        step(&format!(
            "tier 3: north-south end to end with --xdp {xdp} (the underlay made a wire: full \
             checksums, XDP on the bridge ports)"
        ));
        cargo_env(
            &[
                "test",
                "-p",
                "svc-tests",
                "--test",
                "northsouth_e2e",
                "--test",
                "source_ranges_e2e",
                "--",
                "--test-threads=1",
            ],
            &[("SVC_TEST_XDP", xdp)],
        )?;
    }
    Ok(())
}

fn bench() -> anyhow::Result<()> {
    cargo(&RELEASE_BINS)?;
    step("bench: the packet path, established flow, 1 vs 100,000 Services (kernel-timed)");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()))
        .args([
            "test",
            "--release",
            "-p",
            "svc-tests",
            "--test",
            "fixtures",
            "--",
            "perf/",
            "--test-threads=1",
        ])
        .env("SVC_FIXTURE_REPEAT", "20000")
        .current_dir(workspace_root())
        .status()
        .context("running the packet benchmark")?;
    if !status.success() {
        bail!("the packet benchmark failed ({status})");
    }
    step(
        "bench: the control plane, API server and directory to maps (change latency, cold sync, \
         memory, burst, churn CPU)",
    );
    run_bin("svc-bench-sync")?;
    step(
        "bench: north-south, an external client through NodePorts vs the pod directly (wrk, nginx)",
    );
    setup::bench_tools()?;
    run_bin("svc-bench-northsouth")
}

fn require_root(why: &str) -> anyhow::Result<()> {
    if !setup::is_root() {
        bail!("these steps need root: {why}. Run `sudo -E cargo xtask ...` (CI runs as root).");
    }
    Ok(())
}

fn step(what: &str) {
    eprintln!("\n==> {what}");
}

/// Runs cargo (the one that runs xtask) from the workspace root.
fn cargo(args: &[&str]) -> anyhow::Result<()> {
    cargo_env(args, &[])
}

/// Runs cargo (the one that runs xtask) from the workspace root with `env` set.
fn cargo_env(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(&cargo)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("running {cargo} {}", args.join(" ")))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}
