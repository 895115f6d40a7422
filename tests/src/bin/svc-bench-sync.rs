//! `cargo xtask bench`: how fast the agent follows the API server (a benchmark, not a test).
//!
//! For each scale (1,000 / 10,000 / 30,000 `ClusterIP` Services, one TCP port, one
//! `EndpointSlice` with 3 ready endpoints each), in an emulated node with its own bpffs:
//!
//! - **cold sync**: the test API server holds every object; a fresh `svc-agent run
//!   --kubeconfig` starts (empty maps) and the clock runs until it has listed everything and
//!   programmed it (its "svc-agent running" line comes after the first pass). Printed: the
//!   whole time from process start (load + verifier + attach + list + compute + write), and the
//!   agent's own figure for the first pass (compute + write), plus the agent's RSS after it.
//! - **change latency**: one `EndpointSlice` at a time gains (or loses) a fourth endpoint in the
//!   API server; the clock runs from that write until the frontend's entry in the pinned
//!   `SERVICES_V1` map shows the new endpoint count (polled from this process, ~µs per look).
//!   This includes the watch delivery, the agent's coalescing window (`--coalesce-ms`,
//!   default 20 ms: the floor of every figure), the recompute and the map writes. p50/p99/max
//!   over the samples, and how many map entries one change wrote (it must be only that
//!   Service's).
//!
//! Run as root (eBPF maps, namespaces). Removes everything it created.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use serde_json::{Value, json};
use svc_agent::{
    datapath::render::frontend_key,
    model::{FrontendKey, Protocol, Scope},
};
use svc_common::service::{ServiceKey, ServiceValue};
use svc_tests::{
    apiserver::{ApiServer, Options},
    k8s::{self, Agent},
    netns::{self, Topology},
};

/// Service counts measured.
const SCALES: [u32; 3] = [1_000, 10_000, 30_000];
/// Endpoints per Service.
const ENDPOINTS: u32 = 3;
/// Change samples per scale.
const SAMPLES: usize = 200;
/// Bound on one change reaching the map.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on a cold sync.
const SYNC_TIMEOUT: Duration = Duration::from_secs(90);
const PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;

fn main() -> anyhow::Result<()> {
    netns::require_root()?;
    let agent_bin = k8s::agent_binary()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    println!(
        "svc-agent following the API server (test API server in the node's namespace; 1 TCP \
         port and {ENDPOINTS} endpoints per Service)\n"
    );
    println!(
        "{:>9} {:>10} {:>11} {:>9}   {:>8} {:>8} {:>8} {:>8} {:>7}   {:>10} {:>8}",
        "services",
        "cold sync",
        "first pass",
        "agent RSS",
        "chg p50",
        "chg p99",
        "chg max",
        "samples",
        "written",
        "pass p50",
        "compute"
    );
    // SVC_BENCH_SCALES=1000,5000 and SVC_BENCH_SAMPLES=50 narrow a run.
    let scales: Vec<u32> = std::env::var("SVC_BENCH_SCALES").map_or_else(
        |_| Ok(SCALES.to_vec()),
        |v| v.split(',').map(str::parse).collect::<Result<_, _>>(),
    )?;
    let samples: usize = std::env::var("SVC_BENCH_SAMPLES").map_or(Ok(SAMPLES), |v| v.parse())?;
    for services in scales {
        let row = rt.block_on(scale(&agent_bin, services, samples))?;
        println!(
            "{services:>9} {:>8.0}ms {:>9.0}ms {:>7}MiB   {:>6.1}ms {:>6.1}ms {:>6.1}ms {:>8} {:>7}   {:>8.1}ms {:>6.1}ms",
            row.cold_sync.as_secs_f64() * 1e3,
            row.first_pass_ms,
            row.rss_kib / 1024,
            ms(percentile(&row.latencies, 50)),
            ms(percentile(&row.latencies, 99)),
            ms(row.latencies.last().copied().unwrap_or_default()),
            row.latencies.len(),
            row.written,
            ms(Duration::from_micros(row.pass.1)),
            ms(Duration::from_micros(row.pass.0)),
        );
    }
    println!(
        "\ncold sync: agent process start to its first complete pass (load, verifier, attach, \
         list, compute, write);\nfirst pass: the agent's own time for that pass; chg: an \
         EndpointSlice write in the API server to SERVICES_V1 showing it\n(includes the \
         {} ms coalescing window); written: map entries written per change (max over samples);\n\
         pass p50: the agent's median time for one change pass, of it compute: the desired-state model.",
        20
    );
    Ok(())
}

struct Row {
    cold_sync: Duration,
    first_pass_ms: f64,
    rss_kib: u64,
    latencies: Vec<Duration>,
    written: u64,
    /// The median change pass: (compute µs, whole pass µs).
    pass: (u64, u64),
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) * p).div_ceil(100);
    sorted[i.min(sorted.len() - 1)]
}

/// `198.19.x.y`: the VIP of Service `i`.
fn vip(i: u32) -> Ipv4Addr {
    let base = u32::from(Ipv4Addr::new(198, 19, 0, 0));
    Ipv4Addr::from(base + 1 + i)
}

/// Endpoint `j` of Service `i`: a unique address:port in 198.18.128.0/17.
fn endpoint(i: u32, j: u32) -> (Ipv4Addr, u16) {
    let n = i * (ENDPOINTS + 1) + j;
    let base = u32::from(Ipv4Addr::new(198, 18, 128, 0));
    let port = TARGET_PORT + u16::try_from(n / 32_768).unwrap_or(0);
    (Ipv4Addr::from(base + n % 32_768), port)
}

fn service_json(i: u32) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc-{i}"), "namespace": "bench"},
        "spec": {
            "type": "ClusterIP", "clusterIP": vip(i).to_string(), "clusterIPs": [vip(i).to_string()],
            "ipFamilies": ["IPv4"], "ports": [{"name": "http", "port": PORT, "protocol": "TCP", "targetPort": TARGET_PORT}],
        },
    })
}

fn slice_json(i: u32, endpoints: u32) -> Value {
    let eps: Vec<Value> = (0..endpoints)
        .map(|j| {
            let (ip, _) = endpoint(i, j);
            json!({"addresses": [ip.to_string()], "conditions": {"ready": true, "serving": true, "terminating": false}, "nodeName": "node2"})
        })
        .collect();
    let (_, port) = endpoint(i, 0);
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": format!("svc-{i}-abcde"), "namespace": "bench",
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": eps,
    })
}

async fn scale(agent_bin: &Path, services: u32, samples: usize) -> anyhow::Result<Row> {
    let topo = Topology::new()?;
    let node = topo.node(0).clone();
    let api = ApiServer::start_in(
        &node.ns,
        SocketAddr::new(node.underlay_v4.into(), 0),
        Options {
            max_objects: 100_000,
            ..Options::default()
        },
    )
    .await?;
    let kubeconfig = topo.run_dir().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    api.apply_yaml(&k8s::node_yaml(&node))?;
    for i in 0..services {
        api.apply_json(service_json(i))?;
        api.apply_json(slice_json(i, ENDPOINTS))?;
    }
    let entries = (services * (ENDPOINTS + 2)).next_power_of_two();
    let sizes = [
        ("--max-service-entries", entries),
        ("--max-backends", entries),
        ("--max-conntrack-entries", 16_384),
    ];
    // Cold sync.
    let started = Instant::now();
    let agent_bin = agent_bin.to_owned();
    let (node2, kubeconfig2) = (node.clone(), kubeconfig.clone());
    let agent = tokio::task::spawn_blocking(move || {
        Agent::start_kube_sized(&agent_bin, &node2, &kubeconfig2, &sizes, SYNC_TIMEOUT)
    })
    .await??;
    let cold_sync = started.elapsed();
    let first_pass_ms = sync_lines(&agent)
        .first()
        .and_then(|l| field(l, "took_us"))
        .map_or(f64::NAN, |us| Duration::from_micros(us).as_secs_f64() * 1e3);
    let rss_kib = rss_kib(agent.pid()).unwrap_or(0);

    // Change latency.
    let services_map = open_services(&node.bpffs)?;
    let mut latencies = Vec::with_capacity(samples);
    let mut passes = Vec::with_capacity(samples);
    let mut written = 0;
    for sample in 0..samples {
        let i = u32::try_from(sample).unwrap_or(0) * 7919 % services;
        let key = frontend_key(&FrontendKey {
            addr: IpAddr::V4(vip(i)),
            port: PORT,
            proto: Protocol::Tcp,
            scope: Scope::Internal,
        });
        let before = sync_lines(&agent).len();
        let t = Instant::now();
        api.apply_json(slice_json(i, ENDPOINTS + 1))?;
        wait_count(&services_map, &key, ENDPOINTS + 1, t).await?;
        latencies.push(t.elapsed());
        // Back to 3 (not timed), so every sample is the same kind of change.
        api.apply_json(slice_json(i, ENDPOINTS))?;
        wait_count(&services_map, &key, ENDPOINTS, Instant::now()).await?;
        // Let the log catch up, then read what the two passes wrote.
        tokio::time::sleep(Duration::from_millis(2 + (sample as u64 % 7))).await;
        for line in sync_lines(&agent).iter().skip(before) {
            written = written.max(
                field(line, "services_written").unwrap_or(0)
                    + field(line, "backends_written").unwrap_or(0),
            );
            if let (Some(compute), Some(took)) = (field(line, "compute_us"), field(line, "took_us"))
            {
                passes.push((compute, took));
            }
        }
    }
    if std::env::var_os("SVC_BENCH_VERBOSE").is_some() {
        for line in sync_lines(&agent).iter().rev().take(3) {
            eprintln!("{line}");
        }
    }
    latencies.sort();
    passes.sort_unstable_by_key(|p| p.1);
    drop(agent);
    drop(api);
    drop(topo);
    Ok(Row {
        cold_sync,
        first_pass_ms,
        rss_kib,
        latencies,
        written,
        pass: passes.get(passes.len() / 2).copied().unwrap_or_default(),
    })
}

fn open_services(bpffs: &Path) -> anyhow::Result<BpfHashMap<MapData, ServiceKey, ServiceValue>> {
    let path = bpffs.join(svc_common::PIN_SUBDIR).join("SERVICES_V1");
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    Ok(BpfHashMap::try_from(Map::HashMap(data))?)
}

async fn wait_count(
    map: &BpfHashMap<MapData, ServiceKey, ServiceValue>,
    key: &ServiceKey,
    count: u32,
    since: Instant,
) -> anyhow::Result<()> {
    loop {
        if map.get(key, 0).is_ok_and(|v| u32::from(v.count) == count) {
            return Ok(());
        }
        if since.elapsed() > CHANGE_TIMEOUT {
            bail!("the change did not reach SERVICES_V1 within {CHANGE_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_micros(100)).await;
    }
}

fn sync_lines(agent: &Agent) -> Vec<String> {
    agent
        .log()
        .lines()
        .filter(|l| l.contains("synced from the API server"))
        .map(str::to_owned)
        .collect()
}

/// A numeric `key=value` field of a log line.
fn field(line: &str, name: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    let kib = line
        .split_whitespace()
        .nth(1)
        .context("bad VmRSS line")?
        .parse()?;
    ensure!(kib > 0, "RSS 0");
    Ok(kib)
}
