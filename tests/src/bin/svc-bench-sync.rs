//! `cargo xtask bench`: the agent's control plane in figures (a benchmark, not a test: it prints
//! figures and targets, it asserts nothing and stays out of CI).
//!
//! Every case is one source, one scale and one endpoint count: `ClusterIP` Services with one TCP
//! port and one `EndpointSlice` of N ready endpoints each (N = 3; a 10-endpoint variant at the
//! scales of `SVC_BENCH_WIDE_SCALES`), programmed by a fresh `svc-agent run` (default map sizes,
//! `--coalesce-ms 5`, `--no-events`) in an emulated node with its own bpffs. Two sources:
//!
//! - **api**: the test API server (`tests/src/apiserver`) holds the objects in the node's
//!   namespace; the agent follows it with `--kubeconfig`; a change is an `EndpointSlice` update
//!   in the server.
//! - **dir**: the same objects as YAML files (Services 1,000 per file, one file per
//!   `EndpointSlice`, the Node); the agent follows the directory with `--from-dir`; a change
//!   rewrites one slice's file atomically (hidden temporary file, then `rename`).
//!
//! Measured per case (one row of the table):
//!
//! - **cold sync**: from spawning the agent (empty maps) to its "svc-agent running" line, which it
//!   logs after its first pass (load, verifier, attach, list or read, compute, write), from the
//!   line's own timestamp; and the agent's own figure for that first pass when it logs one
//!   (`took_us` of the API server source; the directory source logs none).
//! - **sync CPU**: the agent's CPU time (utime + stime, all threads: load, verifier, list,
//!   compute, write) at the end of the cold sync. Steadier than the cold sync's wall time on a
//!   small, busy machine, where the agent's threads, the kernel and the test API server share
//!   the cores.
//! - **RSS / HWM**: the agent's `VmRSS` after the cold sync and its peak `VmHWM` at the end.
//! - **change latency**: one `EndpointSlice` at a time loses its last endpoint, then gets it
//!   back; each of the two writes is timed until the frontend's entry in the pinned
//!   `SERVICES_V1` map shows the new endpoint count (polled from this process every 50 µs).
//!   p50 / p99 / max over the samples (`n`); from the agent's log, the most map entries one of
//!   those passes wrote and its median pass time (with the model's share; API server source).
//! - **burst**: 1,000 distinct slices (fewer at smaller scales) each lose an endpoint, the writes
//!   spread evenly over one second; the time from the last write until the last of them shows in
//!   the map.
//! - **churn CPU**: the agent's CPU time (utime + stime) while slices change at 10 per second
//!   for `SVC_BENCH_CHURN_SECS`, also as a share of one core.
//! - **skipped**: frontends the agent reported as not programmed in its first pass (a full map).
//!
//! Once per run: the memory the kernel charges for the agent's BPF maps (`memlock` of every map
//! the agent holds, from `/proc/<pid>/fdinfo`), at the agent's default map sizes.
//!
//! Knobs: `SVC_BENCH_SCALES=1000,10000`, `SVC_BENCH_WIDE_SCALES=30000` (10-endpoint variants,
//! empty for none), `SVC_BENCH_SOURCES=api,dir`, `SVC_BENCH_SAMPLES` (change pairs, default
//! 100), `SVC_BENCH_SAMPLE_SECS` (time budget of the change samples per case, default 30),
//! `SVC_BENCH_CHURN_SECS` (default 60), `SVC_BENCH_BURST` (default 1000),
//! `SVC_BENCH_SYNC_SECS` (bound on a cold sync, default 600), `SVC_BENCH_STARTUP_LOG` (set: print
//! the agent's log up to its "svc-agent running" line, each line with the milliseconds since the
//! agent was spawned: where a cold sync's time goes).
//!
//! Run as root (eBPF maps, namespaces). Everything a case creates (namespaces, bpffs mounts, the
//! manifest directory, the agent) is removed when it ends, also on error.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use serde_json::Value;
use svc_agent::{
    datapath::render::frontend_key,
    model::{FrontendKey, Protocol, Scope},
};
use svc_common::service::{ServiceKey, ServiceValue};
use svc_tests::{
    apiserver::{ApiServer, Options},
    bench_objects::{PORT, V4_SERVICES, service_json, slice_json, vip},
    k8s::{self, Agent, AgentSource},
    netns::{self, Node, Topology},
    procfs::{cpu_time, status_kib},
};

/// Service counts measured by default.
const SCALES: [u32; 4] = [1_000, 10_000, 30_000, 100_000];
/// Scales that also get a variant with [`WIDE_ENDPOINTS`] endpoints per Service.
const WIDE_SCALES: [u32; 1] = [30_000];
/// Endpoints per Service.
const ENDPOINTS: u32 = 3;
/// Endpoints per Service of the wide variant.
const WIDE_ENDPOINTS: u32 = 10;
/// Change pairs (remove an endpoint, add it back) per case.
const SAMPLES: usize = 100;
/// Time budget of the change samples per case: fewer pairs when a change is slow.
const SAMPLE_SECS: u64 = 30;
/// Duration of the steady churn per case.
const CHURN_SECS: u64 = 60;
/// Changes per second of the steady churn.
const CHURN_RATE: u32 = 10;
/// Changes in the one-second burst.
const BURST: u32 = 1_000;
/// The agent's coalescing window (`--coalesce-ms`).
const COALESCE_MS: u64 = 5;
/// Bound on one change (or the burst) reaching the map.
#[expect(
    clippy::duration_suboptimal_units,
    reason = "Duration::from_mins needs Rust 1.91; the workspace supports 1.89"
)]
const CHANGE_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on the burst's changes reaching the map after its last write.
const BURST_TIMEOUT: Duration = Duration::from_secs(45);
/// Bound on a cold sync, seconds.
const SYNC_SECS: u64 = 600;
/// Services per file in the directory source.
const SERVICES_PER_FILE: u32 = 1_000;
/// How often the map is looked at while waiting for a change.
const POLL: Duration = Duration::from_micros(50);

fn main() -> anyhow::Result<()> {
    netns::require_root()?;
    let config = Config::from_env()?;
    let agent_bin = k8s::agent_binary()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // The API server's tasks run on the runtime's workers; the measurements run on this thread.
    let _rt = rt.enter();
    let run_started = Instant::now();
    println!(
        "svc-agent control plane: {} ClusterIP Services with 1 TCP port and {ENDPOINTS} endpoints \
         each ({WIDE_ENDPOINTS}-endpoint variant at {}; IPv4, IPv6 from the {V4_SERVICES}th \
         Service on);\nagent with its default map sizes, --coalesce-ms {COALESCE_MS}, --no-events\n",
        config
            .scales
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" / "),
        if config.wide.is_empty() {
            "no scale".to_owned()
        } else {
            config
                .wide
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        },
    );
    println!("{}", header());
    let mut memlock = None;
    for case in config.cases() {
        eprintln!(
            "[{:>6.0}s] {} {} Services x {} endpoints",
            run_started.elapsed().as_secs_f64(),
            case.source.name(),
            case.services,
            case.endpoints
        );
        match run_case(&agent_bin, &config, case) {
            Ok(row) => {
                println!("{}", row.format(case));
                memlock = memlock.or(row.memlock);
            }
            Err(e) => {
                let e = format!("{e:#}");
                println!(
                    "{:<6} {:>8} {:>3}  failed: {}",
                    case.source.name(),
                    case.services,
                    case.endpoints,
                    e.lines().next().unwrap_or_default()
                );
                // The rest is usually the agent's log: its last lines say why.
                let lines: Vec<&str> = e.lines().collect();
                for line in &lines[lines.len().saturating_sub(25)..] {
                    eprintln!("    {line}");
                }
            }
        }
    }
    println!("{}", footer(&config, memlock));
    println!(
        "run took {:.0} s",
        run_started.elapsed().as_secs_f64().round()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// Where the agent reads the objects from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// The test API server (`--kubeconfig`).
    Api,
    /// A directory of YAML files (`--from-dir`).
    Dir,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Self::Api => "api",
            Self::Dir => "dir",
        }
    }
}

/// What one run measures (from the environment).
struct Config {
    scales: Vec<u32>,
    wide: Vec<u32>,
    sources: Vec<Source>,
    samples: usize,
    sample_budget: Duration,
    churn: Duration,
    burst: u32,
    sync_timeout: Duration,
}

/// One row of the table.
#[derive(Clone, Copy, Debug)]
struct Case {
    source: Source,
    services: u32,
    endpoints: u32,
}

impl Config {
    fn from_env() -> anyhow::Result<Self> {
        fn list<T>(name: &str, default: &[T]) -> anyhow::Result<Vec<T>>
        where
            T: std::str::FromStr + Clone,
            T::Err: std::error::Error + Send + Sync + 'static,
        {
            match std::env::var(name) {
                Err(_) => Ok(default.to_vec()),
                Ok(v) => v
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| s.replace('_', "").parse::<T>())
                    .collect::<Result<_, _>>()
                    .with_context(|| format!("{name}={v}")),
            }
        }
        fn number<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T>
        where
            T::Err: std::error::Error + Send + Sync + 'static,
        {
            std::env::var(name).map_or(Ok(default), |v| {
                v.trim().parse().with_context(|| format!("{name}={v}"))
            })
        }
        let sources = list::<String>("SVC_BENCH_SOURCES", &["api".into(), "dir".into()])?
            .iter()
            .map(|s| match s.as_str() {
                "api" => Ok(Source::Api),
                "dir" => Ok(Source::Dir),
                other => bail!("SVC_BENCH_SOURCES: {other:?} is neither api nor dir"),
            })
            .collect::<anyhow::Result<_>>()?;
        let config = Self {
            scales: list("SVC_BENCH_SCALES", &SCALES)?,
            wide: list("SVC_BENCH_WIDE_SCALES", &WIDE_SCALES)?,
            sources,
            samples: number("SVC_BENCH_SAMPLES", SAMPLES)?,
            sample_budget: Duration::from_secs(number("SVC_BENCH_SAMPLE_SECS", SAMPLE_SECS)?),
            churn: Duration::from_secs(number("SVC_BENCH_CHURN_SECS", CHURN_SECS)?),
            burst: number("SVC_BENCH_BURST", BURST)?,
            sync_timeout: Duration::from_secs(number("SVC_BENCH_SYNC_SECS", SYNC_SECS)?),
        };
        if config.scales.contains(&0) {
            bail!("SVC_BENCH_SCALES: a scale needs at least one Service");
        }
        Ok(config)
    }

    /// The cases in the order they run: by scale, then endpoint count, then source.
    fn cases(&self) -> Vec<Case> {
        let mut cases = Vec::new();
        for &services in &self.scales {
            let mut widths = vec![ENDPOINTS];
            if self.wide.contains(&services) {
                widths.push(WIDE_ENDPOINTS);
            }
            for endpoints in widths {
                for &source in &self.sources {
                    cases.push(Case {
                        source,
                        services,
                        endpoints,
                    });
                }
            }
        }
        cases
    }
}

fn yaml(value: &Value) -> anyhow::Result<String> {
    serde_saphyr::to_string(value).context("printing YAML")
}

/// Where the objects live and how one slice is rewritten.
enum Feed {
    Api(ApiServer),
    Dir(PathBuf),
}

impl Feed {
    /// Holds `services` Services of `width` endpoints (and the node's Node object).
    fn create(source: Source, topo: &Topology, node: &Node, case: Case) -> anyhow::Result<Self> {
        match source {
            Source::Api => {
                let api = futures_block(ApiServer::start_in(
                    &node.ns,
                    SocketAddr::new(node.underlay_v4.into(), 0),
                    Options {
                        max_objects: usize::try_from(case.services)? * 2 + 100,
                        ..Options::default()
                    },
                ))?;
                api.apply_yaml(&k8s::node_yaml(node))?;
                for i in 0..case.services {
                    api.apply_json(service_json(i))?;
                    api.apply_json(slice_json(i, case.endpoints, case.endpoints))?;
                }
                Ok(Self::Api(api))
            }
            Source::Dir => {
                let dir = topo.run_dir().join("manifests");
                fs::create_dir_all(&dir)?;
                fs::write(dir.join("nodes.yaml"), k8s::node_yaml(node))?;
                let mut text = String::new();
                for i in 0..case.services {
                    text.push_str("---\n");
                    text.push_str(&yaml(&service_json(i))?);
                    if (i + 1) % SERVICES_PER_FILE == 0 || i + 1 == case.services {
                        let file = format!("services-{:04}.yaml", i / SERVICES_PER_FILE);
                        fs::write(dir.join(file), &text)?;
                        text.clear();
                    }
                }
                let feed = Self::Dir(dir);
                for i in 0..case.services {
                    feed.set_slice(i, case.endpoints, case.endpoints)?;
                }
                Ok(feed)
            }
        }
    }

    /// The agent's source flag for this feed (`kubeconfig`: where to write one).
    fn agent_source<'a>(&'a self, kubeconfig: &'a Path) -> anyhow::Result<AgentSource<'a>> {
        Ok(match self {
            Self::Api(api) => {
                api.write_kubeconfig(kubeconfig)?;
                AgentSource::Kube(kubeconfig)
            }
            Self::Dir(dir) => AgentSource::Dir(dir),
        })
    }

    /// Replaces Service `i`'s slice with one of its first `count` endpoints.
    fn set_slice(&self, i: u32, width: u32, count: u32) -> anyhow::Result<()> {
        match self {
            Self::Api(api) => {
                api.apply_json(slice_json(i, width, count))?;
            }
            Self::Dir(dir) => {
                let text = yaml(&slice_json(i, width, count))?;
                let tmp = dir.join(format!(".slice-{i}.yaml.tmp"));
                fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
                let dst = dir.join(format!("slice-{i}.yaml"));
                fs::rename(&tmp, &dst).with_context(|| format!("renaming to {}", dst.display()))?;
            }
        }
        Ok(())
    }
}

/// Runs `future` on the entered runtime from this (non-worker) thread.
fn futures_block<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Handle::current().block_on(future)
}

// ---------------------------------------------------------------------------------------------
// One case
// ---------------------------------------------------------------------------------------------

/// What one case measured.
#[derive(Default)]
struct Row {
    cold_sync: Duration,
    first_pass: Option<Duration>,
    /// The agent's CPU time at the end of the cold sync.
    sync_cpu: Option<Duration>,
    rss_kib: u64,
    hwm_kib: u64,
    latencies: Vec<Duration>,
    burst: Option<Burst>,
    churn: Option<(Duration, Duration, u32)>,
    frontends: Option<u64>,
    /// The most map entries one pass of the change samples wrote.
    written: Option<u64>,
    /// The median pass of the change samples as the agent logs it: (whole pass, compute).
    pass: Option<(Duration, Duration)>,
    skipped: u64,
    notes: Vec<String>,
    memlock: Option<(usize, u64)>,
}

fn run_case(agent_bin: &Path, config: &Config, case: Case) -> anyhow::Result<Row> {
    let topo = Topology::new()?;
    let node = topo.node(0).clone();
    let feed = Feed::create(case.source, &topo, &node, case)?;
    let kubeconfig = topo.run_dir().join("kubeconfig");
    let source = feed.agent_source(&kubeconfig)?;
    let coalesce = COALESCE_MS.to_string();
    let flags = ["--coalesce-ms", coalesce.as_str(), "--no-events"];
    let agent = Agent::start_with_flags(agent_bin, &node, &source, &flags, config.sync_timeout)?;
    let mut row = Row::default();
    let log = agent.log();
    let running = log
        .lines()
        .find(|l| l.contains("svc-agent running"))
        .and_then(log_time)
        .context("no timestamp on the agent's \"svc-agent running\" line")?;
    row.cold_sync = running
        .duration_since(agent.spawned_at())
        .unwrap_or_default();
    if std::env::var_os("SVC_BENCH_STARTUP_LOG").is_some() {
        print_startup(&log, agent.spawned_at());
    }
    let first = agent.first_sync_line().unwrap_or_default();
    row.first_pass = field(&first, "took_us").map(Duration::from_micros);
    row.frontends = field(&first, "frontends");
    // The first pass's warnings come before its "synced" line (the API server source repeats
    // them on every pass).
    let first_pass_lines = log.lines().take_while(|l| !l.contains(" synced "));
    for line in first_pass_lines.filter(|l| l.contains("not programmed")) {
        row.skipped += 1;
        if row.skipped == 1 {
            let why = line
                .find("map ")
                .map_or(line, |at| &line[at..])
                .trim_end_matches(['"', ' ']);
            row.notes
                .push(format!("not programmed: {}", why.replace("\\\"", "")));
        }
    }
    row.rss_kib = status_kib(agent.pid(), "VmRSS:")?;
    row.sync_cpu = Some(cpu_time(agent.pid())?);
    row.memlock = Some(maps_memlock(agent.pid())?);

    let map = open_services(&node.bpffs)?;
    let picks = programmed(&map, case, config.burst.max(CHURN_RATE))?;
    if picks.is_empty() {
        bail!("not one of the Services is programmed");
    }
    let mut m = Measure {
        feed: &feed,
        map: &map,
        width: case.endpoints,
    };
    let before = sync_lines(&agent).len();
    row.latencies = m.changes(&picks, config.samples, config.sample_budget)?;
    // Let the log catch up with the last pass.
    std::thread::sleep(Duration::from_millis(50));
    let mut passes = Vec::new();
    for line in sync_lines(&agent).iter().skip(before) {
        let written = field(line, "services_written").unwrap_or(0)
            + field(line, "backends_written").unwrap_or(0);
        row.written = Some(row.written.unwrap_or(0).max(written));
        if let (Some(compute), Some(took)) = (field(line, "compute_us"), field(line, "took_us")) {
            passes.push((Duration::from_micros(took), Duration::from_micros(compute)));
        }
    }
    passes.sort_unstable();
    row.pass = passes.get(passes.len() / 2).copied();
    let burst = m.burst(&picks, config.burst)?;
    row.burst = Some(burst);
    if let Some(note) = burst.note() {
        row.notes.push(note);
    } else if !config.churn.is_zero() {
        row.churn = Some(m.churn(agent.pid(), &picks, config.churn)?);
    }
    row.hwm_kib = status_kib(agent.pid(), "VmHWM:")?;
    let node_name = agent.node().to_owned();
    let (status, log) = agent.stop_with_log()?;
    if !status.success() {
        row.notes.push(format!("agent ended with {status}"));
    }
    let warnings = log
        .lines()
        .filter(|l| {
            (l.contains(" WARN ") || l.contains(" ERROR ")) && !l.contains("not programmed")
        })
        .count();
    if warnings > 0 {
        row.notes
            .push(format!("{warnings} other warnings on {node_name}"));
        if std::env::var_os("SVC_BENCH_VERBOSE").is_some() {
            for l in log
                .lines()
                .filter(|l| l.contains(" WARN ") && !l.contains("not programmed"))
                .take(5)
            {
                eprintln!("{l}");
            }
        }
    }
    drop(feed);
    drop(topo);
    Ok(row)
}

/// What the burst measured.
#[derive(Clone, Copy, Debug)]
struct Burst {
    /// Slices changed.
    changes: u32,
    /// From the last write until the map showed every change (or the bound passed).
    took: Duration,
    /// Changes the map did not show within [`BURST_TIMEOUT`].
    missing: u32,
    /// Of the untimed changes putting the endpoints back, those the map did not show within
    /// [`CHANGE_TIMEOUT`].
    unrestored: u32,
}

impl Burst {
    /// Why the churn that follows is not measured, if the agent is still behind.
    fn note(&self) -> Option<String> {
        if self.missing > 0 {
            Some(format!(
                "burst: {} of {} changes not in the map {} s after the last write; churn not \
                 measured (the agent is still behind)",
                self.missing,
                self.changes,
                BURST_TIMEOUT.as_secs()
            ))
        } else if self.unrestored > 0 {
            Some(format!(
                "{} of the {} changes putting the burst's endpoints back (written at once, \
                 untimed) not in the map {} s later; churn not measured",
                self.unrestored,
                self.changes,
                CHANGE_TIMEOUT.as_secs()
            ))
        } else {
            None
        }
    }
}

/// The measurements after the cold sync: writes through the feed, polls the map.
struct Measure<'a> {
    feed: &'a Feed,
    map: &'a ServicesMap,
    width: u32,
}

type ServicesMap = BpfHashMap<MapData, ServiceKey, ServiceValue>;

impl Measure<'_> {
    /// Change pairs over `picks` (remove the last endpoint, add it back), each write timed until
    /// the map shows it; stops after `samples` pairs or when `budget` has passed. Sorted.
    fn changes(
        &mut self,
        picks: &[u32],
        samples: usize,
        budget: Duration,
    ) -> anyhow::Result<Vec<Duration>> {
        let started = Instant::now();
        let mut latencies = Vec::with_capacity(samples * 2);
        for (n, &i) in picks.iter().cycle().take(samples).enumerate() {
            if n > 0 && started.elapsed() > budget {
                break;
            }
            for count in [self.width - 1, self.width] {
                let t = Instant::now();
                self.feed.set_slice(i, self.width, count)?;
                self.wait(&[i], count, t)?;
                latencies.push(t.elapsed());
                // Not back to back: a change arrives on its own, as most do.
                std::thread::sleep(Duration::from_millis(2 + (n as u64 % 7)));
            }
        }
        latencies.sort();
        Ok(latencies)
    }

    /// `count` (at most `picks.len()`) slices each lose an endpoint, spread over one second;
    /// returns how many, and the time from the last write until the map showed all of them or
    /// (after [`BURST_TIMEOUT`]) how many it still did not show. Puts the endpoints back
    /// afterwards (untimed) when all arrived.
    fn burst(&mut self, picks: &[u32], count: u32) -> anyhow::Result<Burst> {
        let picks = &picks[..picks.len().min(usize::try_from(count)?)];
        let n = u32::try_from(picks.len())?;
        let started = Instant::now();
        for (k, &i) in (0..n).zip(picks) {
            let at = started + Duration::from_secs(1) * k / n;
            if let Some(wait) = at.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            self.feed.set_slice(i, self.width, self.width - 1)?;
        }
        let last = Instant::now();
        let missing = self.wait_until(picks, self.width - 1, last, BURST_TIMEOUT);
        let took = last.elapsed();
        let mut unrestored = 0;
        if missing == 0 {
            for &i in picks {
                self.feed.set_slice(i, self.width, self.width)?;
            }
            unrestored = self.wait_until(picks, self.width, Instant::now(), CHANGE_TIMEOUT);
        }
        Ok(Burst {
            changes: n,
            took,
            missing: u32::try_from(missing)?,
            unrestored: u32::try_from(unrestored)?,
        })
    }

    /// Changes at [`CHURN_RATE`] per second for `duration` (toggling slices of `picks`); returns
    /// the agent's CPU time over it, the wall time (to the last change showing in the map) and
    /// the changes made.
    fn churn(
        &mut self,
        pid: u32,
        picks: &[u32],
        duration: Duration,
    ) -> anyhow::Result<(Duration, Duration, u32)> {
        let changes = u32::try_from(duration.as_millis() * u128::from(CHURN_RATE) / 1000)?;
        let picks = &picks[..picks.len().min(usize::try_from(CHURN_RATE * 10)?)];
        let mut lowered = vec![false; picks.len()];
        let cpu_before = cpu_time(pid)?;
        let started = Instant::now();
        let mut last = None;
        for k in 0..changes {
            let at = started + Duration::from_secs(1) * k / CHURN_RATE;
            if let Some(wait) = at.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let slot = usize::try_from(k)? % picks.len();
            lowered[slot] = !lowered[slot];
            let count = if lowered[slot] {
                self.width - 1
            } else {
                self.width
            };
            self.feed.set_slice(picks[slot], self.width, count)?;
            last = Some((picks[slot], count, Instant::now()));
        }
        if let Some((i, count, at)) = last {
            self.wait(&[i], count, at)?;
        }
        let wall = started.elapsed();
        let cpu = cpu_time(pid)?.saturating_sub(cpu_before);
        Ok((cpu, wall, changes))
    }

    /// Waits until every Service of `services` has `count` endpoints in the map.
    fn wait(&self, services: &[u32], count: u32, since: Instant) -> anyhow::Result<()> {
        let missing = self.wait_until(services, count, since, CHANGE_TIMEOUT);
        if missing > 0 {
            bail!(
                "{missing} of {} changes did not reach SERVICES_V1 within {CHANGE_TIMEOUT:?}",
                services.len()
            );
        }
        Ok(())
    }

    /// Waits until every Service of `services` has `count` endpoints in the map, at most until
    /// `timeout` after `since`; returns how many did not get there (0: all did).
    fn wait_until(&self, services: &[u32], count: u32, since: Instant, timeout: Duration) -> usize {
        let mut pending: Vec<ServiceKey> = services.iter().map(|&i| key(i)).collect();
        loop {
            pending.retain(|k| {
                self.map
                    .get(k, 0)
                    .map_or(true, |v| u32::from(v.count) != count)
            });
            if pending.is_empty() || since.elapsed() > timeout {
                return pending.len();
            }
            std::thread::sleep(POLL);
        }
    }
}

/// The `SERVICES_V1` key of Service `i`'s frontend.
fn key(i: u32) -> ServiceKey {
    frontend_key(&FrontendKey {
        addr: vip(i),
        port: PORT,
        proto: Protocol::Tcp,
        scope: Scope::Internal,
    })
}

/// Up to `want` Services, spread over the whole range, whose frontend is programmed with all
/// its endpoints (a frontend the agent skipped cannot show a change).
fn programmed(map: &ServicesMap, case: Case, want: u32) -> anyhow::Result<Vec<u32>> {
    let mut picks = Vec::new();
    // 7919 is prime, so k * 7919 % services visits every Service once when services is not a
    // multiple of it.
    for k in 0..case.services {
        let i = u32::try_from(u64::from(k) * 7919 % u64::from(case.services))?;
        if map
            .get(&key(i), 0)
            .is_ok_and(|v| u32::from(v.count) == case.endpoints)
        {
            picks.push(i);
            if picks.len() >= usize::try_from(want)? {
                break;
            }
        }
    }
    Ok(picks)
}

fn open_services(bpffs: &Path) -> anyhow::Result<ServicesMap> {
    let path = bpffs.join(svc_common::PIN_SUBDIR).join("SERVICES_V1");
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    Ok(BpfHashMap::try_from(Map::HashMap(data))?)
}

// ---------------------------------------------------------------------------------------------
// The agent's log and /proc
// ---------------------------------------------------------------------------------------------

/// The agent's "synced" lines (one per pass), in order.
fn sync_lines(agent: &Agent) -> Vec<String> {
    agent
        .log()
        .lines()
        .filter(|l| l.contains(" synced "))
        .map(str::to_owned)
        .collect()
}

/// A numeric `key=value` field of a log line.
fn field(line: &str, name: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
}

/// The timestamp a log line starts with (`2026-12-03T23:41:16.123456Z`, UTC).
/// The agent's log up to its "svc-agent running" line, each line after the milliseconds from
/// `spawned` to its timestamp (on stderr, beside the progress lines).
fn print_startup(log: &str, spawned: SystemTime) {
    for line in log.lines() {
        let ms = log_time(line)
            .and_then(|t| t.duration_since(spawned).ok())
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
        // The timestamp is replaced by the offset.
        let rest = line.split_once(' ').map_or(line, |(_, rest)| rest);
        eprintln!("  {ms:>8.1} ms  {rest}");
        if line.contains("svc-agent running") {
            break;
        }
    }
}

fn log_time(line: &str) -> Option<SystemTime> {
    let stamp = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut date = date.split('-').map(str::parse::<i64>);
    let (y, m, d) = (date.next()?.ok()?, date.next()?.ok()?, date.next()?.ok()?);
    let mut time = time.split(':');
    let hours: u64 = time.next()?.parse().ok()?;
    let minutes: u64 = time.next()?.parse().ok()?;
    let seconds: f64 = time.next()?.parse().ok()?;
    let days = u64::try_from(days_from_civil(y, m, d)).ok()?;
    let whole = days * 86_400 + hours * 3_600 + minutes * 60;
    Some(UNIX_EPOCH + Duration::from_secs(whole) + Duration::from_secs_f64(seconds))
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The BPF maps `pid` holds a descriptor of: how many (distinct `map_id`s) and the sum of their
/// `memlock`, from `/proc/<pid>/fdinfo`.
fn maps_memlock(pid: u32) -> anyhow::Result<(usize, u64)> {
    let mut maps = BTreeMap::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let Ok(text) = fs::read_to_string(entry?.path()) else {
            continue; // closed meanwhile
        };
        let value = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
        };
        if text.lines().any(|l| l.starts_with("map_type:"))
            && let (Some(id), Some(memlock)) = (value("map_id:"), value("memlock:"))
        {
            maps.insert(id, memlock);
        }
    }
    Ok((maps.len(), maps.values().sum()))
}

// ---------------------------------------------------------------------------------------------
// The table
// ---------------------------------------------------------------------------------------------

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn percentile(sorted: &[Duration], p: usize) -> Option<Duration> {
    let last = sorted.len().checked_sub(1)?;
    Some(sorted[(last * p).div_ceil(100).min(last)])
}

/// `value (target ok)` or `value (target MISS)`; just `value` without a target.
fn judged(value: String, target: Option<(&str, bool)>) -> String {
    match target {
        Some((target, met)) => format!("{value} ({target} {})", if met { "ok" } else { "MISS" }),
        None => value,
    }
}

fn mib(kib: u64) -> String {
    format!("{}MiB", kib.div_ceil(1024))
}

fn header() -> String {
    format!(
        "{:<6} {:>8} {:>3}  {:<19} {:>8} {:>8}  {:<19} {:>7}  {:<18} {:<19} {:>8} {:>4} {:>7} {:>17}  {:<22} {:<12} {:>7}  notes",
        "source",
        "services",
        "eps",
        "cold sync",
        "1st pass",
        "sync CPU",
        "RSS",
        "HWM",
        "change p50",
        "change p99",
        "max",
        "n",
        "written",
        "pass p50 (model)",
        "burst (last->map)",
        "churn CPU",
        "skipped",
    )
}

impl Row {
    fn format(&self, case: Case) -> String {
        let cold_target = match case.services {
            30_000 => Some(("<=1s", self.cold_sync <= Duration::from_secs(1))),
            100_000 => Some(("<=3s", self.cold_sync <= Duration::from_secs(3))),
            _ => None,
        };
        let rss_target = match case.services {
            30_000 => Some(("<=100MiB", self.rss_kib <= 100 * 1024)),
            100_000 => Some(("<=250MiB", self.rss_kib <= 250 * 1024)),
            _ => None,
        };
        let latency = |p: usize, limit_ms: f64, target: &'static str| {
            percentile(&self.latencies, p).map_or_else(
                || "-".to_owned(),
                |d| judged(format!("{:.1}ms", ms(d)), Some((target, ms(d) <= limit_ms))),
            )
        };
        let burst = self.burst.map_or_else(
            || "-".to_owned(),
            |b| {
                if b.missing > 0 {
                    judged(
                        format!(
                            "{}/{} >{}s",
                            b.changes - b.missing,
                            b.changes,
                            b.took.as_secs()
                        ),
                        Some(("<=1s", false)),
                    )
                } else {
                    judged(
                        format!("{}: {:.0}ms", b.changes, ms(b.took)),
                        Some(("<=1s", b.took <= Duration::from_secs(1))),
                    )
                }
            },
        );
        let churn = self.churn.map_or_else(
            || "-".to_owned(),
            |(cpu, wall, _)| {
                format!(
                    "{:.2}s {:.1}%",
                    cpu.as_secs_f64(),
                    cpu.as_secs_f64() * 100.0 / wall.as_secs_f64()
                )
            },
        );
        let mut line = format!(
            "{:<6} {:>8} {:>3}  {:<19} {:>8} {:>8}  {:<19} {:>7}  {:<18} {:<19} {:>8} {:>4} {:>7} {:>17}  {:<22} {:<12} {:>7}  ",
            case.source.name(),
            case.services,
            case.endpoints,
            judged(format!("{:.0}ms", ms(self.cold_sync)), cold_target),
            self.first_pass
                .map_or_else(|| "n/a".to_owned(), |d| format!("{:.0}ms", ms(d))),
            self.sync_cpu
                .map_or_else(|| "-".to_owned(), |d| format!("{:.2}s", d.as_secs_f64())),
            judged(mib(self.rss_kib), rss_target),
            mib(self.hwm_kib),
            latency(50, 5.0, "<=5"),
            latency(99, 10.0, "<=10"),
            percentile(&self.latencies, 100)
                .map_or_else(|| "-".to_owned(), |d| format!("{:.1}ms", ms(d))),
            self.latencies.len(),
            self.written
                .map_or_else(|| "-".to_owned(), |w| w.to_string()),
            self.pass.map_or_else(
                || "n/a".to_owned(),
                |(pass, model)| format!("{:.1}ms ({:.1}ms)", ms(pass), ms(model))
            ),
            burst,
            churn,
            self.skipped,
        );
        line.push_str(&self.notes.join("; "));
        if let Some(frontends) = self.frontends
            && frontends != u64::from(case.services)
        {
            let _ = write!(line, "; {frontends} frontends computed");
        }
        line.trim_end().to_owned()
    }
}

fn footer(config: &Config, memlock: Option<(usize, u64)>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\ncold sync: spawning svc-agent (empty maps) to its \"svc-agent running\" line, logged \
         after its first pass (load, verifier, attach, list/read, compute, write);\n1st pass: \
         the agent's own time for that pass (compute + write; logged by the API server source \
         only, n/a for dir);\nsync CPU: the agent's CPU time (utime+stime, every thread) when \
         the cold sync ended;"
    );
    let _ = writeln!(
        out,
        "RSS: the agent's VmRSS after the cold sync; HWM: its peak (VmHWM) at the end of the case;"
    );
    let _ = writeln!(
        out,
        "change: one EndpointSlice written (api: updated in the API server; dir: its file \
         replaced by rename) to SERVICES_V1 showing it,\n  n timed changes (half remove an \
         endpoint, half add it back; at most {} pairs or {} s per case); includes the agent's \
         coalescing window, --coalesce-ms {COALESCE_MS};",
        config.samples,
        config.sample_budget.as_secs()
    );
    let _ = writeln!(
        out,
        "written: the most map entries (SERVICES_V1 + BACKENDS_V1) one pass of those changes \
         wrote; pass p50 (model): the agent's own median time for such a pass and, of it, the \
         desired-state model's compute (logged by the API server source only);"
    );
    let _ = writeln!(
        out,
        "burst: that many slices each lose an endpoint, writes spread over 1 s; time from the \
         last write until the map shows all of them\n  (a/n >{t}s: only a of the n changes were \
         in the map {t} s after the last write);",
        t = BURST_TIMEOUT.as_secs()
    );
    let _ = writeln!(
        out,
        "churn CPU: the agent's utime+stime over {} s of {CHURN_RATE} slice changes per second \
         (SVC_BENCH_CHURN_SECS; the issue asks for 600 s), and as a share of one core;",
        config.churn.as_secs()
    );
    let _ = writeln!(
        out,
        "skipped: frontends the agent's first pass reported as not programmed (a full map); \
         targets are printed, never enforced."
    );
    match memlock {
        Some((maps, bytes)) => {
            let _ = writeln!(
                out,
                "BPF maps: {maps} maps, memlock {:.1} MiB in all, at the agent's default sizes \
                 (SERVICES_V1 {}, BACKENDS_V1 {}, CT_V1 {}, CT_NEW_V1 {}, AFFINITY_V1 {}, \
                 SOCK_REVNAT_V1 {}, SOCK_UDP_PIN_V1 {} entries).",
                bytes_mib(bytes),
                svc_common::sizes::SERVICES,
                svc_common::sizes::BACKENDS,
                svc_common::sizes::CT,
                svc_common::sizes::CT_NEW,
                svc_common::sizes::AFFINITY,
                svc_common::sock::SOCK_REVNAT_ENTRIES,
                svc_common::sock::SOCK_UDP_PIN_ENTRIES,
            );
        }
        None => {
            let _ = writeln!(out, "BPF maps: not measured (no case ran).");
        }
    }
    out
}

#[expect(
    clippy::cast_precision_loss,
    reason = "a figure to print: bytes far below 2^52"
)]
fn bytes_mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}
