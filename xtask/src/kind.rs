//! `cargo xtask kind up | bench | down [--compare kube-proxy[=iptables|nftables]]`: the cluster
//! benchmark on real kind clusters, where Docker and kind exist (not on the project's own
//! machines, which have no Docker engine: there every action fails at once saying so).
//!
//! - `up`: a kind cluster without kube-proxy (`manifests/kind/kind-config.yaml`, rendered by
//!   [`render_kind_config`]), the agent's image built (`cargo xtask build`, then `docker build`
//!   with `manifests/deploy/Dockerfile`) and loaded (`kind load docker-image`), the `DaemonSet`
//!   applied (`manifests/deploy/`, metrics on `0.0.0.0:10249` so the benchmark can read them
//!   through the API server's node proxy) and waited for, then the echo Deployment and Service
//!   (`manifests/kind/echo.yaml`). With `--compare kube-proxy`, a second cluster with kube-proxy
//!   in iptables (default) or nftables mode gets the echo Deployment too.
//! - `bench`: the same load generator as `cargo xtask bench cluster` against each cluster's API
//!   server (`svc-bench-cluster` with `SVC_BENCH_KUBECONFIG`), the echo pods as endpoints, and
//!   the same table; per-node latency there comes from each node's
//!   `kubeproxy_network_programming_duration_seconds` histogram (the agent and kube-proxy both
//!   export it).
//! - `down`: deletes the clusters.
//!
//! Kubeconfigs and rendered configs live in `target/kind/`.

use std::{
    ffi::OsStr,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::Subcommand;

use crate::{cargo, step, workspace_root};

/// The tools every action needs.
const TOOLS: [&str; 3] = ["docker", "kind", "kubectl"];

/// The agent's image tag (the `DaemonSet`'s `image:`).
const IMAGE: &str = "svc-agent:dev";

/// The svc cluster's name (as in `manifests/kind/kind-config.yaml`).
const SVC_CLUSTER: &str = "svc";

/// Workers per cluster (besides the control plane).
const WORKERS: usize = 2;

/// What to do.
#[derive(Subcommand, Clone, Debug)]
pub enum Action {
    /// Create the cluster(s), build and load the agent's image, deploy the `DaemonSet` and the
    /// echo Deployment.
    Up {
        /// Also a second cluster with kube-proxy (`kube-proxy`, `kube-proxy=iptables`,
        /// `kube-proxy=nftables`).
        #[arg(long, value_parser = parse_compare)]
        compare: Option<ProxyMode>,
    },
    /// Run the load generator against the cluster(s) and print the table.
    Bench {
        /// Also on the kube-proxy cluster.
        #[arg(long, value_parser = parse_compare)]
        compare: Option<ProxyMode>,
    },
    /// Delete the cluster(s).
    Down {
        /// Also the kube-proxy cluster.
        #[arg(long, value_parser = parse_compare)]
        compare: Option<ProxyMode>,
    },
}

/// Who programs Services in a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyMode {
    /// No kube-proxy: svc-agent does it.
    Svc,
    /// kube-proxy in iptables mode.
    Iptables,
    /// kube-proxy in nftables mode.
    Nftables,
}

impl ProxyMode {
    /// kind's `networking.kubeProxyMode`.
    fn kind_value(self) -> &'static str {
        match self {
            Self::Svc => "none",
            Self::Iptables => "iptables",
            Self::Nftables => "nftables",
        }
    }
}

/// `--compare`'s value: `kube-proxy` (iptables), `kube-proxy=iptables`, `kube-proxy=nftables`.
fn parse_compare(value: &str) -> Result<ProxyMode, String> {
    match value {
        "kube-proxy" | "kube-proxy=iptables" => Ok(ProxyMode::Iptables),
        "kube-proxy=nftables" => Ok(ProxyMode::Nftables),
        other => Err(format!(
            "{other:?}: expected kube-proxy, kube-proxy=iptables or kube-proxy=nftables"
        )),
    }
}

/// One kind cluster of a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSpec {
    /// kind's cluster name (its nodes are `<name>-control-plane`, `<name>-worker`, ...).
    pub name: String,
    /// Who programs Services.
    pub mode: ProxyMode,
    /// Worker nodes.
    pub workers: usize,
}

/// The clusters of a run: the svc one, and the kube-proxy one when comparing.
#[must_use]
pub fn clusters(compare: Option<ProxyMode>) -> Vec<ClusterSpec> {
    let mut out = vec![ClusterSpec {
        name: SVC_CLUSTER.to_owned(),
        mode: ProxyMode::Svc,
        workers: WORKERS,
    }];
    if let Some(mode) = compare.filter(|m| *m != ProxyMode::Svc) {
        out.push(ClusterSpec {
            name: format!("svc-kube-proxy-{}", mode.kind_value()),
            mode,
            workers: WORKERS,
        });
    }
    out
}

/// The kind configuration of `spec`: dual-stack, one control plane and `workers` workers;
/// `kubeProxyMode: none` for svc; for kube-proxy its mode and its metrics on every address
/// (kube-proxy's default is loopback), so the benchmark reads them as it reads the agent's.
#[must_use]
pub fn render_kind_config(spec: &ClusterSpec) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4");
    let _ = writeln!(out, "name: {}", spec.name);
    let _ = writeln!(
        out,
        "networking:\n  kubeProxyMode: {}\n  ipFamily: dual",
        spec.mode.kind_value()
    );
    if spec.mode != ProxyMode::Svc {
        out.push_str(
            "kubeadmConfigPatches:\n  - |\n    kind: KubeProxyConfiguration\n    \
             metricsBindAddress: \"0.0.0.0:10249\"\n",
        );
    }
    out.push_str("nodes:\n  - role: control-plane\n");
    for _ in 0..spec.workers {
        out.push_str("  - role: worker\n");
    }
    out
}

/// The tools of `tools` found in no directory of `path` (a `PATH` value).
#[must_use]
pub fn missing_tools<'a>(path: &OsStr, tools: &[&'a str]) -> Vec<&'a str> {
    let dirs: Vec<PathBuf> = std::env::split_paths(path).collect();
    tools
        .iter()
        .copied()
        .filter(|tool| !dirs.iter().any(|d| d.join(tool).is_file()))
        .collect()
}

/// Fails at once, naming what is missing, unless docker, kind and kubectl are on `PATH` and a
/// Docker engine answers.
fn require_tools() -> anyhow::Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let missing = missing_tools(&path, &TOOLS);
    if !missing.is_empty() {
        bail!(
            "cargo xtask kind needs {} on PATH; missing: {}. Install them (kind: \
             https://kind.sigs.k8s.io) on a machine with a Docker engine; the emulated cluster \
             runs anywhere: `cargo xtask bench cluster`.",
            TOOLS.join(", "),
            missing.join(", ")
        );
    }
    let info = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .context("running `docker info`")?;
    if !info.status.success() {
        bail!(
            "docker is on PATH but no Docker engine answers (`docker info`: {}): kind needs a \
             running Docker engine. The emulated cluster runs without one: `cargo xtask bench \
             cluster`.",
            String::from_utf8_lossy(&info.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `action`.
pub fn run(action: &Action) -> anyhow::Result<()> {
    require_tools()?;
    let dir = workspace_root().join("target/kind");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    match action {
        Action::Up { compare } => {
            for spec in clusters(*compare) {
                up(&spec, &dir)?;
            }
        }
        Action::Bench { compare } => {
            cargo(&[
                "build",
                "--release",
                "-p",
                "svc-tests",
                "--bin",
                "svc-bench-cluster",
            ])?;
            for spec in clusters(*compare) {
                bench(&spec, &dir)?;
            }
        }
        Action::Down { compare } => {
            for spec in clusters(*compare) {
                step(&format!("kind: deleting cluster {}", spec.name));
                run_cmd(Command::new("kind").args(["delete", "cluster", "--name", &spec.name]))?;
            }
        }
    }
    Ok(())
}

fn kubeconfig(spec: &ClusterSpec, dir: &Path) -> PathBuf {
    dir.join(format!("{}.kubeconfig", spec.name))
}

fn kubectl(spec: &ClusterSpec, dir: &Path) -> Command {
    let mut cmd = Command::new("kubectl");
    cmd.arg("--kubeconfig").arg(kubeconfig(spec, dir));
    cmd
}

fn up(spec: &ClusterSpec, dir: &Path) -> anyhow::Result<()> {
    let root = workspace_root();
    let config = dir.join(format!("{}.yaml", spec.name));
    std::fs::write(&config, render_kind_config(spec))
        .with_context(|| format!("writing {}", config.display()))?;
    step(&format!(
        "kind: creating cluster {} (kube-proxy mode {})",
        spec.name,
        spec.mode.kind_value()
    ));
    run_cmd(
        Command::new("kind")
            .args(["create", "cluster", "--name", &spec.name, "--config"])
            .arg(&config)
            .arg("--kubeconfig")
            .arg(kubeconfig(spec, dir)),
    )?;
    if spec.mode == ProxyMode::Svc {
        step("kind: building and loading the svc-agent image");
        cargo(&["build", "--release", "-p", "svc-agent"])?;
        run_cmd(
            Command::new("docker")
                .args(["build", "-t", IMAGE, "-f"])
                .arg(root.join("manifests/deploy/Dockerfile"))
                .arg(root.join("target/release")),
        )?;
        run_cmd(Command::new("kind").args(["load", "docker-image", IMAGE, "--name", &spec.name]))?;
        // Without kube-proxy nothing translates the `kubernetes` Service yet: the agent
        // reaches the API server directly (the DaemonSet reads this ConfigMap).
        run_cmd(
            kubectl(spec, dir)
                .args([
                    "-n",
                    "kube-system",
                    "create",
                    "configmap",
                    "svc-agent-apiserver",
                ])
                .arg(format!("--from-literal=host={}-control-plane", spec.name))
                .arg("--from-literal=port=6443"),
        )?;
        run_cmd(
            kubectl(spec, dir)
                .args(["apply", "-f"])
                .arg(root.join("manifests/deploy")),
        )?;
        run_cmd(kubectl(spec, dir).args([
            "-n",
            "kube-system",
            "set",
            "env",
            "daemonset/svc-agent",
            "SVC_METRICS_BIND_ADDRESS=0.0.0.0:10249",
        ]))?;
        run_cmd(kubectl(spec, dir).args([
            "-n",
            "kube-system",
            "rollout",
            "status",
            "daemonset/svc-agent",
            "--timeout=300s",
        ]))?;
    }
    step("kind: the echo Deployment and Service");
    run_cmd(
        kubectl(spec, dir)
            .args(["apply", "-f"])
            .arg(root.join("manifests/kind/echo.yaml")),
    )?;
    run_cmd(kubectl(spec, dir).args([
        "-n",
        "svc-bench",
        "rollout",
        "status",
        "deployment/svc-echo",
        "--timeout=300s",
    ]))
}

fn bench(spec: &ClusterSpec, dir: &Path) -> anyhow::Result<()> {
    let config = kubeconfig(spec, dir);
    if !config.is_file() {
        bail!(
            "no kubeconfig for cluster {} at {}: run `cargo xtask kind up` first",
            spec.name,
            config.display()
        );
    }
    step(&format!(
        "kind: the load generator against cluster {} ({})",
        spec.name,
        match spec.mode {
            ProxyMode::Svc => "svc-agent",
            ProxyMode::Iptables => "kube-proxy, iptables",
            ProxyMode::Nftables => "kube-proxy, nftables",
        }
    ));
    run_cmd(
        Command::new(workspace_root().join("target/release/svc-bench-cluster"))
            .env("SVC_BENCH_KUBECONFIG", &config),
    )
}

fn run_cmd(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!(
        "{} {}",
        cmd.get_program().display(),
        cmd.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let status = cmd.status().with_context(|| format!("running {shown}"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_svc_config_is_the_checked_in_one() {
        let checked_in = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/kind/kind-config.yaml"),
        )
        .unwrap();
        let mut without_comments = String::new();
        for line in checked_in
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
        {
            without_comments.push_str(line);
            without_comments.push('\n');
        }
        assert_eq!(render_kind_config(&clusters(None)[0]), without_comments);
    }

    #[test]
    fn the_comparison_cluster_runs_kube_proxy_in_the_asked_mode_with_its_metrics_reachable() {
        let specs = clusters(Some(parse_compare("kube-proxy=nftables").unwrap()));
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[1].name, "svc-kube-proxy-nftables");
        let config = render_kind_config(&specs[1]);
        assert!(config.contains("  kubeProxyMode: nftables\n"), "{config}");
        assert!(
            config.contains("metricsBindAddress: \"0.0.0.0:10249\""),
            "{config}"
        );
        assert_eq!(config.matches("role: worker").count(), WORKERS);
        assert_eq!(parse_compare("kube-proxy"), Ok(ProxyMode::Iptables));
        assert!(parse_compare("ipvs").unwrap_err().contains("expected"));
        // svc's own cluster has no kube-proxy and no kube-proxy patch.
        let svc = render_kind_config(&specs[0]);
        assert!(svc.contains("kubeProxyMode: none") && !svc.contains("KubeProxyConfiguration"));
    }

    #[test]
    fn missing_tools_are_named() {
        let dir = std::env::temp_dir().join(format!("xtask-kind-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("kubectl"), "").unwrap();
        let path = std::env::join_paths([dir.clone(), dir.join("nowhere")]).unwrap();
        assert_eq!(missing_tools(&path, &TOOLS), ["docker", "kind"]);
        assert_eq!(missing_tools(OsStr::new(""), &["kind"]), ["kind"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
