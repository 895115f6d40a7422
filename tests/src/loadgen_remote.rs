//! The load generator against a real cluster (`cargo xtask kind bench`): the echo pods of
//! `manifests/kind/echo.yaml` as the endpoint pool, the same plan as the emulated cluster's,
//! and per node what its Service proxy (svc-agent or kube-proxy) reports in its metrics,
//! read through the API server's node proxy (`/api/v1/nodes/<node>:10249/proxy/metrics`):
//!
//! - network programming latency: the change of the
//!   `kubeproxy_network_programming_duration_seconds` histogram over the run (both proxies
//!   export it, measured from the slices' `endpoints.kubernetes.io/last-change-trigger-time`,
//!   which the generator sets at each write); each observation counts as its bucket's upper
//!   bound, so p50/p99 are bucket bounds (0.25 s and up: coarse), and observations beyond the
//!   last finite bucket count as missed;
//! - CPU: the change of `process_cpu_seconds_total` when the proxy exports it (kube-proxy does;
//!   svc-agent does not: n/a).
//!
//! Requests from client pods and peak RSS are not measured on a real cluster (n/a).

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api, Client,
    api::ListParams,
    config::{KubeConfigOptions, Kubeconfig},
};

use crate::{
    loadgen::{self, Config, Generator, PoolPod},
    loadgen_table::NodeRow,
};

/// The histogram both proxies export.
pub const PROGRAMMING: &str = "kubeproxy_network_programming_duration_seconds";

/// The label selecting the echo pods (`manifests/kind/echo.yaml`).
pub const ECHO_SELECTOR: &str = "app=svc-echo";

/// The cumulative buckets of histogram `name` in a Prometheus text exposition: `(le, count)`,
/// in the order given (`le` is `f64::INFINITY` for `+Inf`).
#[must_use]
pub fn histogram(text: &str, name: &str) -> Vec<(f64, u64)> {
    let prefix = format!("{name}_bucket{{");
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(&prefix)?;
            let (labels, value) = rest.rsplit_once('}')?;
            let le = labels
                .split(',')
                .find_map(|l| l.trim().strip_prefix("le="))?
                .trim_matches('"');
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count = value.trim().parse::<f64>().ok()?;
            // Counts are whole numbers, printed as floats by some exporters.
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "a non-negative whole count"
            )]
            Some((le, count.max(0.0) as u64))
        })
        .collect()
}

/// The value of the unlabelled sample `name` (a counter or gauge), if present.
#[must_use]
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix(' ')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The observations between two readings of one histogram, each as its bucket's upper bound,
/// and how many fell beyond the last finite bucket.
#[must_use]
pub fn observations(before: &[(f64, u64)], after: &[(f64, u64)]) -> (Vec<Duration>, usize) {
    // The same exporter prints the same bounds: they are compared bit for bit.
    let count_at = |buckets: &[(f64, u64)], le: f64| {
        buckets
            .iter()
            .find(|(b, _)| b.to_bits() == le.to_bits())
            .map_or(0, |(_, c)| *c)
    };
    let mut out = Vec::new();
    let mut beyond = 0;
    let mut below = 0u64;
    for &(le, cumulative) in after {
        let delta = cumulative.saturating_sub(count_at(before, le));
        let in_bucket = delta.saturating_sub(below);
        below = delta.max(below);
        if le.is_finite() {
            for _ in 0..in_bucket {
                out.push(Duration::from_secs_f64(le));
            }
        } else {
            beyond += usize::try_from(in_bucket).unwrap_or(usize::MAX);
        }
    }
    (out, beyond)
}

/// A client for the cluster `kubeconfig` points at (its current context).
pub async fn client(kubeconfig: &Path) -> anyhow::Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading {}", kubeconfig.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .context("a client configuration from the kubeconfig")?;
    Client::try_from(config).context("building a kube client")
}

/// The ready echo pods of `namespace` (addresses of their primary family).
pub async fn echo_pods(client: &Client, namespace: &str) -> anyhow::Result<Vec<PoolPod>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let list = pods
        .list(&ListParams::default().labels(ECHO_SELECTOR))
        .await
        .with_context(|| format!("listing the pods {ECHO_SELECTOR} in {namespace}"))?;
    let mut pool = Vec::new();
    for pod in list {
        let ready = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let ip = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref());
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        if let (true, Some(ip), Some(node), Some(name)) = (ready, ip, node, pod.metadata.name) {
            pool.push(PoolPod {
                ip: ip
                    .parse()
                    .with_context(|| format!("pod {name}'s podIP {ip:?}"))?,
                node,
                name,
            });
        }
    }
    Ok(pool)
}

/// Node `node`'s Service proxy metrics, through the API server's node proxy.
pub async fn metrics(client: &Client, node: &str) -> anyhow::Result<String> {
    let request =
        hyper::Request::get(format!("/api/v1/nodes/{node}:10249/proxy/metrics")).body(Vec::new())?;
    client.request_text(request).await.with_context(|| {
        format!(
            "reading {node}'s metrics on port 10249 through the API server (the agent needs \
             SVC_METRICS_BIND_ADDRESS=0.0.0.0:10249, kube-proxy metricsBindAddress 0.0.0.0:10249)"
        )
    })
}

/// Runs `config`'s plan against the cluster of `kubeconfig` (Services get their `ClusterIPs`
/// from the API server) and returns one row per node. Leftovers of an interrupted run are
/// deleted first.
pub async fn run(kubeconfig: &Path, config: &Config) -> anyhow::Result<Vec<NodeRow>> {
    let client = client(kubeconfig).await?;
    let pool = echo_pods(&client, &config.namespace).await?;
    let plan = loadgen::plan(config, &pool).with_context(|| {
        format!(
            "{} ready echo pods in {} ({ECHO_SELECTOR}; `cargo xtask kind up` deploys them)",
            pool.len(),
            config.namespace
        )
    })?;
    let nodes: Vec<String> = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .context("listing the Nodes")?
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    if nodes.is_empty() {
        bail!("the cluster has no Nodes");
    }
    loadgen::clean_up(&client, &config.namespace).await?;
    let mut before = Vec::new();
    for node in &nodes {
        before.push(metrics(&client, node).await?);
    }
    let started = Instant::now();
    let mut generator = Generator::new(&client, config, &pool)?;
    generator.run(&plan, 0, |_| {}).await?;
    // The proxies' last passes (a pass observes the latency when it ends).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let wall = started.elapsed();
    let mut rows = Vec::new();
    for (node, before) in nodes.iter().zip(before) {
        let after = metrics(&client, node).await?;
        let (latencies, beyond) = observations(
            &histogram(&before, PROGRAMMING),
            &histogram(&after, PROGRAMMING),
        );
        let cpu = sample(&after, "process_cpu_seconds_total")
            .zip(sample(&before, "process_cpu_seconds_total"))
            .map(|(a, b)| (Duration::from_secs_f64((a - b).max(0.0)), wall));
        rows.push(NodeRow {
            node: node.clone(),
            latencies,
            missed: Some(beyond),
            superseded: None,
            rollout_requests: None,
            other_requests: None,
            cpu,
            peak_rss_kib: None,
        });
    }
    loadgen::clean_up(&client, &config.namespace).await?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "\
# TYPE kubeproxy_network_programming_duration_seconds histogram
kubeproxy_network_programming_duration_seconds_bucket{le=\"0.25\"} 2
kubeproxy_network_programming_duration_seconds_bucket{le=\"0.5\"} 3
kubeproxy_network_programming_duration_seconds_bucket{le=\"+Inf\"} 3
kubeproxy_network_programming_duration_seconds_sum 0.7
process_cpu_seconds_total 1.5
";
    const AFTER: &str = "\
kubeproxy_network_programming_duration_seconds_bucket{le=\"0.25\"} 12
kubeproxy_network_programming_duration_seconds_bucket{le=\"0.5\"} 14
kubeproxy_network_programming_duration_seconds_bucket{le=\"+Inf\"} 15
process_cpu_seconds_total 2.25
";

    #[test]
    fn histogram_deltas_become_bucket_bounds() {
        let before = histogram(BEFORE, PROGRAMMING);
        assert_eq!(before, [(0.25, 2), (0.5, 3), (f64::INFINITY, 3)]);
        let (seen, beyond) = observations(&before, &histogram(AFTER, PROGRAMMING));
        // 10 new observations in the first bucket, 1 in the second, 1 beyond the last.
        assert_eq!(seen.len(), 11);
        assert_eq!(seen[0], Duration::from_millis(250));
        assert_eq!(seen[10], Duration::from_millis(500));
        assert_eq!(beyond, 1);
        // No reading before (a proxy that just started): everything is new.
        let (all, _) = observations(&[], &histogram(BEFORE, PROGRAMMING));
        assert_eq!(all.len(), 3);
    }

    #[test]
    fn samples_are_read_by_exact_name() {
        assert_eq!(sample(AFTER, "process_cpu_seconds_total"), Some(2.25));
        assert_eq!(sample(AFTER, "process_cpu_seconds"), None);
        assert!(histogram(AFTER, "other").is_empty());
    }
}
