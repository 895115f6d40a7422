//! The agent's Prometheus metrics (`--metrics-bind-address`, `/metrics`, `OpenMetrics` text).
//!
//! [`METRICS`] is the one list of them (name, type, labels, meaning; the README's table says
//! the same, and a test checks that every one is there). kube-proxy's names are used where the
//! meaning matches (`kubeproxy_sync_proxy_rules_*`), ours are prefixed `svc_`.
//!
//! Where the numbers come from: both sources (`source::kube`, `standalone`) report each pass
//! and each change they learn of to one shared [`Recorder`] (cheap to clone; atomics inside, so
//! a scrape never waits for a pass nor a pass for a scrape); the `CT_V1` pressure thread
//! reports the table's fill every 30 s; the kernel's per-CPU counters (`PKT_STATS_V1`,
//! `DROP_STATS_V1`) are read at scrape time with the code `inspect stats` uses. The
//! [`Recorder`] also holds the agent's [`Health`] (`/healthz`, `/livez`), which the same
//! reports drive; the health-check node ports (`healthcheck`) read it and report their
//! listeners to it.

use std::{
    path::PathBuf,
    sync::{Arc, atomic::AtomicU64},
    time::{Duration, SystemTime},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};
use tracing::debug;

use crate::{
    datapath::{DatapathMaps, Reconciler},
    health::Health,
};

/// A metric's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Type {
    /// Only goes up (the name ends in `_total`).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Observations in buckets (`_bucket`, `_sum`, `_count`).
    Histogram,
}

/// One metric: its name as scraped, type, labels and meaning.
#[derive(Clone, Copy, Debug)]
pub struct Def {
    /// The name as scraped (counters end in `_total`; histograms' series add `_bucket`,
    /// `_sum`, `_count`).
    pub name: &'static str,
    /// Its type.
    pub kind: Type,
    /// Its labels.
    pub labels: &'static [&'static str],
    /// What it means.
    pub help: &'static str,
}

const fn def(
    name: &'static str,
    kind: Type,
    labels: &'static [&'static str],
    help: &'static str,
) -> Def {
    Def {
        name,
        kind,
        labels,
        help,
    }
}

/// Every metric the agent serves (the README's table says the same).
pub const METRICS: &[Def] = &[
    def(
        "kubeproxy_sync_proxy_rules_duration_seconds",
        Type::Histogram,
        &[],
        "Seconds each pass took (full, incremental and audit), from its start to its last map write",
    ),
    def(
        "kubeproxy_sync_full_proxy_rules_duration_seconds",
        Type::Histogram,
        &[],
        "Seconds each full pass took (first sync, relist, audit: every frontend computed and every map entry compared)",
    ),
    def(
        "kubeproxy_sync_partial_proxy_rules_duration_seconds",
        Type::Histogram,
        &[],
        "Seconds each incremental pass took (only the Services whose objects changed)",
    ),
    def(
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        Type::Gauge,
        &[],
        "Unix time at which the last pass ended",
    ),
    def(
        "kubeproxy_network_programming_duration_seconds",
        Type::Histogram,
        &[],
        "API server source: seconds from an EndpointSlice's endpoints.kubernetes.io/last-change-trigger-time (set by the EndpointSlice controller) to the end of the pass that programmed it; changes older than the agent are not observed",
    ),
    def(
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        Type::Counter,
        &[],
        "EndpointSlice changes the source learnt of (API server: watch events; directory: slices changed, hand-written or computed from Pods)",
    ),
    def(
        "kubeproxy_sync_proxy_rules_service_changes_total",
        Type::Counter,
        &[],
        "Service changes the source learnt of (API server: watch events; directory: Services changed in the files)",
    ),
    def(
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
        Type::Gauge,
        &[],
        "API server source: EndpointSlices changed since the last pass began (0 with the directory source, which reads its files when the pass runs)",
    ),
    def(
        "kubeproxy_sync_proxy_rules_service_changes_pending",
        Type::Gauge,
        &[],
        "API server source: Services changed since the last pass began (0 with the directory source)",
    ),
    def(
        "kubeproxy_healthz_total",
        Type::Counter,
        &["code"],
        "/healthz answers by HTTP status code",
    ),
    def(
        "kubeproxy_livez_total",
        Type::Counter,
        &["code"],
        "/livez answers by HTTP status code",
    ),
    def(
        "svc_passes_total",
        Type::Counter,
        &["kind"],
        "Passes by kind: full (first sync, relist), incremental (changed Services only, and retries), audit (the periodic full computation and diff, with or without changes)",
    ),
    def(
        "svc_audit_drift_total",
        Type::Counter,
        &["part"],
        "What audits found wrong and fixed: part=model, frontends the incremental model had differently from the full computation; part=maps, map entries written or removed",
    ),
    def(
        "svc_frontends",
        Type::Gauge,
        &["state"],
        "Frontends (Service address, port, protocol) after the last pass: state=programmed, waiting (not programmed: a map is full; programmed as room appears), unsupported (this datapath cannot program it)",
    ),
    def(
        "svc_backends_programmed",
        Type::Gauge,
        &[],
        "Backends in BACKENDS_V1 after the last pass",
    ),
    def(
        "svc_bad_objects",
        Type::Gauge,
        &[],
        "Objects skipped by the last pass because a field is invalid (each is logged, and published as an Event by the API server source)",
    ),
    def(
        "svc_map_entries",
        Type::Gauge,
        &["map"],
        "Entries in a map: SERVICES_V1 and BACKENDS_V1 as the last pass left them, CT_V1 counted every 30 s",
    ),
    def(
        "svc_map_max_entries",
        Type::Gauge,
        &["map"],
        "Entries the map can hold (its --max-* flag)",
    ),
    def(
        "svc_map_fill_ratio",
        Type::Gauge,
        &["map"],
        "svc_map_entries / svc_map_max_entries (CT_V1 is an LRU: near 1 new connections evict established ones)",
    ),
    def(
        "svc_datapath_packets_total",
        Type::Counter,
        &["counter"],
        "Kernel counters of PKT_STATS_V1, summed over CPUs at scrape time (inspect stats): what the parser saw (ipv4, tcp, ...), translations (dnat, rev_nat per packet; sock_xlate, sock_rev_nat per socket call), rejected, dropped, ct_miss_midflow, unlisted_port, ...",
    ),
    def(
        "svc_datapath_bytes_total",
        Type::Counter,
        &["counter"],
        "Bytes of the packets counted by svc_datapath_packets_total (0 for the socket counters)",
    ),
    def(
        "svc_datapath_drops_total",
        Type::Counter,
        &["reason"],
        "Packets the programs dropped, by reason (DROP_STATS_V1, summed over CPUs at scrape time)",
    ),
    def(
        "svc_datapath_drop_bytes_total",
        Type::Counter,
        &["reason"],
        "Bytes of the packets counted by svc_datapath_drops_total",
    ),
    def(
        "svc_events_total",
        Type::Counter,
        &["reason", "result"],
        "Kubernetes Events about objects (reason InvalidObject or NotProgrammed): result=published, failed (the API server refused or timed out), dropped (the queue was full)",
    ),
    def(
        "svc_watch_failures_total",
        Type::Counter,
        &["kind"],
        "API server watches that failed (retried with backoff; the datapath keeps the last known state), by kind (Service, EndpointSlice, Node)",
    ),
    def(
        "svc_watch_relists_total",
        Type::Counter,
        &["kind"],
        "Lists after the first (watch expired, 410 Gone, reconnect), by kind; kind=directory: the directory source read every file again (replaced directory, lost events)",
    ),
    def(
        "svc_health_check_ports",
        Type::Gauge,
        &["state"],
        "Health-check node ports (healthCheckNodePort of externalTrafficPolicy Local Services): state=served (listening), unbound (could not be bound: another process holds the port; tried again on every change and every 2 s)",
    ),
    def(
        "svc_health_check_bind_failures_total",
        Type::Counter,
        &[],
        "Attempts to listen on a health-check node port that failed (each is retried)",
    ),
];

/// The definition of `name`.
///
/// # Panics
/// When [`METRICS`] has no such metric (a bug caught by the tests).
fn find(name: &str) -> &'static Def {
    METRICS
        .iter()
        .find(|d| d.name == name)
        .unwrap_or_else(|| panic!("metric {name} is not in METRICS"))
}

/// The name `prometheus-client` is given (it adds `_total` to counters and the unit), and the
/// unit.
fn stem(def: &Def) -> (&'static str, Option<Unit>) {
    let name = match def.kind {
        Type::Counter => def.name.strip_suffix("_total").unwrap_or(def.name),
        Type::Gauge | Type::Histogram => def.name,
    };
    match name.strip_suffix("_seconds") {
        Some(stem) => (stem, Some(Unit::Seconds)),
        None => (name, None),
    }
}

fn register(registry: &mut Registry, name: &str, metric: impl prometheus_client::registry::Metric) {
    let def = find(name);
    match stem(def) {
        (stem, Some(unit)) => registry.register_with_unit(stem, def.help, unit, metric),
        (stem, None) => registry.register(stem, def.help, metric),
    }
}

/// Which pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassKind {
    /// Every object handed over, every map entry compared (first sync, relist).
    Full,
    /// Only the Services whose objects changed (and retries of what waits).
    Incremental,
    /// The periodic audit ran in this pass (the full computation and diff).
    Audit,
}

impl PassKind {
    fn label(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Incremental => "incremental",
            Self::Audit => "audit",
        }
    }
}

/// What became of an Event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventResult {
    /// The API server took it.
    Published,
    /// The API server refused it, or did not answer in time.
    Failed,
    /// The queue was full: not sent.
    Dropped,
}

type Labels1 = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];
type FloatGauge = Gauge<f64, AtomicU64>;

#[derive(Debug)]
struct Metrics {
    pass_duration: Histogram,
    full_duration: Histogram,
    partial_duration: Histogram,
    last_timestamp: FloatGauge,
    programming: Histogram,
    endpoint_changes: Counter,
    service_changes: Counter,
    endpoint_pending: Gauge,
    service_pending: Gauge,
    healthz: Family<Labels1, Counter>,
    livez: Family<Labels1, Counter>,
    passes: Family<Labels1, Counter>,
    drift: Family<Labels1, Counter>,
    frontends: Family<Labels1, Gauge>,
    backends: Gauge,
    bad_objects: Gauge,
    map_entries: Family<Labels1, Gauge>,
    map_max: Family<Labels1, Gauge>,
    map_fill: Family<Labels1, FloatGauge>,
    events: Family<Labels2, Counter>,
    watch_failures: Family<Labels1, Counter>,
    relists: Family<Labels1, Counter>,
    hc_ports: Family<Labels1, Gauge>,
    hc_bind_failures: Counter,
}

/// kube-proxy's buckets for pass durations: 1 ms doubling to about 16 s.
fn pass_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// kube-proxy's buckets for network programming latency: 0.25 s to 5 min.
fn programming_buckets() -> Histogram {
    let buckets = [0.25, 0.5]
        .into_iter()
        .chain((1..60).map(f64::from))
        .chain((0..12).map(|i| 60.0 + 5.0 * f64::from(i)))
        .chain((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    Histogram::new(buckets)
}

impl Metrics {
    #[expect(
        clippy::too_many_lines,
        reason = "one registration per metric, in METRICS order: splitting it hides none"
    )]
    fn register(registry: &mut Registry) -> Self {
        let m = Self {
            pass_duration: pass_buckets(),
            full_duration: pass_buckets(),
            partial_duration: pass_buckets(),
            last_timestamp: FloatGauge::default(),
            programming: programming_buckets(),
            endpoint_changes: Counter::default(),
            service_changes: Counter::default(),
            endpoint_pending: Gauge::default(),
            service_pending: Gauge::default(),
            healthz: Family::default(),
            livez: Family::default(),
            passes: Family::default(),
            drift: Family::default(),
            frontends: Family::default(),
            backends: Gauge::default(),
            bad_objects: Gauge::default(),
            map_entries: Family::default(),
            map_max: Family::default(),
            map_fill: Family::default(),
            events: Family::default(),
            watch_failures: Family::default(),
            relists: Family::default(),
            hc_ports: Family::default(),
            hc_bind_failures: Counter::default(),
        };
        let r = registry;
        register(
            r,
            "kubeproxy_sync_proxy_rules_duration_seconds",
            m.pass_duration.clone(),
        );
        register(
            r,
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            m.full_duration.clone(),
        );
        register(
            r,
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            m.partial_duration.clone(),
        );
        register(
            r,
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            m.last_timestamp.clone(),
        );
        register(
            r,
            "kubeproxy_network_programming_duration_seconds",
            m.programming.clone(),
        );
        register(
            r,
            "kubeproxy_sync_proxy_rules_endpoint_changes_total",
            m.endpoint_changes.clone(),
        );
        register(
            r,
            "kubeproxy_sync_proxy_rules_service_changes_total",
            m.service_changes.clone(),
        );
        register(
            r,
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            m.endpoint_pending.clone(),
        );
        register(
            r,
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            m.service_pending.clone(),
        );
        register(r, "kubeproxy_healthz_total", m.healthz.clone());
        register(r, "kubeproxy_livez_total", m.livez.clone());
        register(r, "svc_passes_total", m.passes.clone());
        register(r, "svc_audit_drift_total", m.drift.clone());
        register(r, "svc_frontends", m.frontends.clone());
        register(r, "svc_backends_programmed", m.backends.clone());
        register(r, "svc_bad_objects", m.bad_objects.clone());
        register(r, "svc_map_entries", m.map_entries.clone());
        register(r, "svc_map_max_entries", m.map_max.clone());
        register(r, "svc_map_fill_ratio", m.map_fill.clone());
        register(r, "svc_events_total", m.events.clone());
        register(r, "svc_watch_failures_total", m.watch_failures.clone());
        register(r, "svc_watch_relists_total", m.relists.clone());
        register(r, "svc_health_check_ports", m.hc_ports.clone());
        register(
            r,
            "svc_health_check_bind_failures_total",
            m.hc_bind_failures.clone(),
        );
        // Series that exist from the start, so a query sees 0 rather than nothing (the guards
        // `get_or_create` returns are dropped at once).
        for kind in [PassKind::Full, PassKind::Incremental, PassKind::Audit] {
            drop(m.passes.get_or_create(&[("kind", kind.label())]));
        }
        for part in ["model", "maps"] {
            drop(m.drift.get_or_create(&[("part", part)]));
        }
        for code in ["200", "503"] {
            drop(m.healthz.get_or_create(&[("code", code)]));
            drop(m.livez.get_or_create(&[("code", code)]));
        }
        m
    }

    fn map(&self, map: &'static str, entries: usize, capacity: u32) {
        let label = [("map", map)];
        self.map_entries
            .get_or_create(&label)
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
        self.map_max.get_or_create(&label).set(i64::from(capacity));
        let ratio = if capacity == 0 {
            0.0
        } else {
            f64::from(u32::try_from(entries).unwrap_or(u32::MAX)) / f64::from(capacity)
        };
        self.map_fill.get_or_create(&label).set(ratio);
    }
}

/// The kernel's counters, read at scrape time from the pinned maps under the bpffs (as
/// `inspect stats` reads them); nothing while they are not pinned yet.
#[derive(Debug)]
struct KernelCounters {
    bpffs: PathBuf,
}

impl KernelCounters {
    fn encode_all(
        encoder: &mut DescriptorEncoder,
        name: &str,
        label: &'static str,
        rows: &[(&'static str, u64)],
    ) -> Result<(), std::fmt::Error> {
        let def = find(name);
        let (stem, _) = stem(def);
        let mut family = encoder.encode_descriptor(stem, def.help, None, MetricType::Counter)?;
        for (value, n) in rows {
            ConstCounter::new(*n).encode(family.encode_family(&[(label, *value)])?)?;
        }
        Ok(())
    }
}

impl Collector for KernelCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        match crate::inspect::read_pkt_stats(&self.bpffs) {
            Ok(stats) => {
                let rows = |f: fn(&svc_common::stats::Counter) -> u64| -> Vec<_> {
                    stats.iter().map(|(c, v)| (c.name(), f(v))).collect()
                };
                let packets = rows(|v| v.packets);
                let bytes = rows(|v| v.bytes);
                Self::encode_all(
                    &mut encoder,
                    "svc_datapath_packets_total",
                    "counter",
                    &packets,
                )?;
                Self::encode_all(&mut encoder, "svc_datapath_bytes_total", "counter", &bytes)?;
            }
            Err(e) => debug!(error = %format!("{e:#}"), "metrics: PKT_STATS_V1 not read"),
        }
        match crate::inspect::read_drop_stats(&self.bpffs) {
            Ok(stats) => {
                let rows = |f: fn(&svc_common::stats::Counter) -> u64| -> Vec<_> {
                    stats.iter().map(|(r, v)| (r.name(), f(v))).collect()
                };
                let packets = rows(|v| v.packets);
                let bytes = rows(|v| v.bytes);
                Self::encode_all(&mut encoder, "svc_datapath_drops_total", "reason", &packets)?;
                Self::encode_all(
                    &mut encoder,
                    "svc_datapath_drop_bytes_total",
                    "reason",
                    &bytes,
                )?;
            }
            Err(e) => debug!(error = %format!("{e:#}"), "metrics: DROP_STATS_V1 not read"),
        }
        Ok(())
    }
}

/// Where the sources, the pressure thread and the HTTP tasks report; see the
/// [module docs](self). Clones share everything.
#[derive(Clone, Debug)]
pub struct Recorder(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    registry: Registry,
    metrics: Metrics,
    health: Health,
    /// When the agent started: network programming latency is observed only for changes made
    /// after it (as kube-proxy).
    started: SystemTime,
}

impl Default for Recorder {
    /// A recorder nobody scrapes (tests, tools): no kernel counters, the default staleness.
    fn default() -> Self {
        Self::new(None, crate::health::DEFAULT_STALE_AFTER)
    }
}

impl Recorder {
    /// A recorder whose scrapes read the kernel's counters under `bpffs` (when given) and
    /// whose health turns stale after `stale_after`.
    #[must_use]
    pub fn new(bpffs: Option<PathBuf>, stale_after: Duration) -> Self {
        Self::with_health(bpffs, Health::new(stale_after))
    }

    /// As [`new`](Self::new), with a given [`Health`] (its clock injected by tests).
    #[must_use]
    pub fn with_health(bpffs: Option<PathBuf>, health: Health) -> Self {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        if let Some(bpffs) = bpffs {
            registry.register_collector(Box::new(KernelCounters { bpffs }));
        }
        Self(Arc::new(Inner {
            registry,
            metrics,
            health,
            started: SystemTime::now(),
        }))
    }

    fn m(&self) -> &Metrics {
        &self.0.metrics
    }

    /// The agent's health (`/healthz`, `/livez`).
    #[must_use]
    pub fn health(&self) -> &Health {
        &self.0.health
    }

    /// One pass ended: its duration, what the maps hold and what waits after it, the objects
    /// it skipped. Programming is fresh again ([`Health::updated`]).
    pub fn pass<M: DatapathMaps>(
        &self,
        kind: PassKind,
        took: Duration,
        rec: &Reconciler<M>,
        bad_objects: usize,
    ) {
        let m = self.m();
        let secs = took.as_secs_f64();
        m.pass_duration.observe(secs);
        match kind {
            PassKind::Incremental => m.partial_duration.observe(secs),
            PassKind::Full | PassKind::Audit => m.full_duration.observe(secs),
        }
        m.passes.get_or_create(&[("kind", kind.label())]).inc();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        m.last_timestamp.set(now.as_secs_f64());
        let fill = rec.fill();
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        for (state, n) in [
            ("programmed", fill.frontends),
            ("waiting", fill.waiting),
            ("unsupported", fill.unsupported),
        ] {
            m.frontends.get_or_create(&[("state", state)]).set(count(n));
        }
        m.backends.set(count(fill.backends));
        m.bad_objects.set(count(bad_objects));
        m.map("SERVICES_V1", fill.service_entries, fill.capacity.services);
        m.map("BACKENDS_V1", fill.backends, fill.capacity.backends);
        m.endpoint_pending.set(0);
        m.service_pending.set(0);
        self.health().updated();
    }

    /// A source checked for changes and found nothing to program: programming is fresh.
    pub fn up_to_date(&self) {
        self.health().updated();
    }

    /// The source learnt of changes (`services` Services, `slices` `EndpointSlice`s).
    pub fn changes(&self, services: usize, slices: usize) {
        self.m().service_changes.inc_by(services as u64);
        self.m().endpoint_changes.inc_by(slices as u64);
    }

    /// A change arrived that the next pass programs (it counts for the health's staleness).
    pub fn queued(&self) {
        self.health().queued();
    }

    /// How many objects wait for the next pass (API server source).
    pub fn pending(&self, services: usize, slices: usize) {
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.m().service_pending.set(count(services));
        self.m().endpoint_pending.set(count(slices));
    }

    /// A pass programmed a change made at `trigger` (an `EndpointSlice`'s
    /// `last-change-trigger-time`); changes older than the agent are not observed.
    pub fn programmed_change(&self, trigger: SystemTime) {
        if trigger < self.0.started {
            return;
        }
        if let Ok(latency) = SystemTime::now().duration_since(trigger) {
            self.m().programming.observe(latency.as_secs_f64());
        }
    }

    /// An audit found `model` frontends computed differently and fixed `maps` map entries.
    pub fn audit_drift(&self, model: usize, maps: usize) {
        let m = self.m();
        m.drift
            .get_or_create(&[("part", "model")])
            .inc_by(model as u64);
        m.drift
            .get_or_create(&[("part", "maps")])
            .inc_by(maps as u64);
    }

    /// A watch of `kind` failed.
    pub fn watch_failed(&self, kind: &'static str) {
        self.m()
            .watch_failures
            .get_or_create(&[("kind", kind)])
            .inc();
    }

    /// `kind` was listed again.
    pub fn relisted(&self, kind: &'static str) {
        self.m().relists.get_or_create(&[("kind", kind)]).inc();
    }

    /// What became of an Event with `reason`.
    pub fn event(&self, reason: &'static str, result: EventResult) {
        let result = match result {
            EventResult::Published => "published",
            EventResult::Failed => "failed",
            EventResult::Dropped => "dropped",
        };
        (self.m().events)
            .get_or_create(&[("reason", reason), ("result", result)])
            .inc();
    }

    /// `CT_V1` holds `entries` of `capacity` (the pressure thread's count).
    pub fn conntrack(&self, entries: usize, capacity: u32) {
        self.m().map("CT_V1", entries, capacity);
    }

    /// The health-check node ports: `served` listening, `unbound` waiting to be bound.
    pub fn health_check_ports(&self, served: usize, unbound: usize) {
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        let ports = &self.m().hc_ports;
        ports
            .get_or_create(&[("state", "served")])
            .set(count(served));
        ports
            .get_or_create(&[("state", "unbound")])
            .set(count(unbound));
    }

    /// Listening on a health-check node port failed.
    pub fn health_check_bind_failed(&self) {
        self.m().hc_bind_failures.inc();
    }

    /// The answer to a health probe, counted by code.
    #[must_use]
    pub fn probe(&self, probe: crate::health::Probe) -> (u16, String) {
        let (code, body) = self.health().answer(probe);
        let family = match probe {
            crate::health::Probe::Healthz => &self.m().healthz,
            crate::health::Probe::Livez => &self.m().livez,
        };
        let code_label = if code == 200 { "200" } else { "503" };
        family.get_or_create(&[("code", code_label)]).inc();
        (code, body)
    }

    /// Every metric in the `OpenMetrics` text format (kernel counters read now).
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.0.registry) {
            debug!(error = %e, "metrics: encoding failed");
        }
        out
    }
}

/// The content type of [`Recorder::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::{
        datapath::{Reconciler, apply::tests::FakeMaps},
        model::{self, Snapshot},
    };

    /// The value of the series `series` (name and labels as rendered).
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn every_metric_is_registered_documented_and_named_as_listed() {
        let r = Recorder::default();
        // Families without a series are not rendered: give each one.
        let rec = Reconciler::adopt(FakeMaps::default()).unwrap();
        r.pass(PassKind::Full, Duration::ZERO, &rec, 0);
        r.conntrack(0, 1);
        r.event("InvalidObject", EventResult::Dropped);
        r.watch_failed("Node");
        r.relisted("Node");
        r.health_check_ports(0, 0);
        let text = r.render();
        let mut names = BTreeSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (stem, kind) = rest.split_once(' ').unwrap();
                names.insert((stem.to_owned(), kind.to_owned()));
            }
        }
        let readme = include_str!("../../README.md");
        for def in METRICS {
            assert!(
                readme.contains(&format!("`{}`", def.name)),
                "{} is not in the README's metrics table",
                def.name
            );
            for label in def.labels {
                assert!(def.help.len() > 10 && !label.is_empty());
            }
            if def.name.starts_with("svc_datapath_") {
                // Read from the kernel at scrape time: no bpffs here.
                continue;
            }
            let (stem, unit) = stem(def);
            let full = match unit {
                Some(u) => format!("{stem}_{}", u.as_str()),
                None => stem.to_owned(),
            };
            let kind = match def.kind {
                Type::Counter => "counter",
                Type::Gauge => "gauge",
                Type::Histogram => "histogram",
            };
            assert!(
                names.contains(&(full.clone(), kind.to_owned())),
                "{} ({kind}) is not rendered as listed:\n{text}",
                def.name
            );
            if def.kind == Type::Counter {
                assert_eq!(format!("{full}_total"), def.name);
            } else {
                assert_eq!(full, def.name);
            }
        }
        assert_eq!(
            names.len() + 4,
            METRICS.len(),
            "everything rendered is listed"
        );
        assert!(text.ends_with("# EOF\n"));
    }

    /// One Service with two ready endpoints.
    fn web_snapshot() -> Snapshot {
        Snapshot::new(
            vec![
                serde_json::from_value(serde_json::json!({
                    "metadata": {"name": "web", "namespace": "default"},
                    "spec": {"clusterIP": "198.19.0.10", "ports": [{"port": 80}]},
                }))
                .unwrap(),
            ],
            vec![
                serde_json::from_value(serde_json::json!({
                    "metadata": {"name": "web-1", "namespace": "default",
                        "labels": {"kubernetes.io/service-name": "web"}},
                    "addressType": "IPv4",
                    "ports": [{"port": 8080}],
                    "endpoints": [{"addresses": ["198.18.0.1"], "conditions": {"ready": true}},
                                  {"addresses": ["198.18.0.2"], "conditions": {"ready": true}}],
                }))
                .unwrap(),
            ],
            vec![],
        )
    }

    #[test]
    fn passes_changes_and_fill_are_rendered() {
        let r = Recorder::default();
        let mut rec = Reconciler::adopt(FakeMaps::default()).unwrap();
        let text = r.render();
        assert_eq!(
            value(&text, "kubeproxy_sync_proxy_rules_duration_seconds_count"),
            Some(0.0)
        );
        assert_eq!(value(&text, "svc_passes_total{kind=\"full\"}"), Some(0.0));

        let snapshot = web_snapshot();
        let desired = model::compute(&snapshot, "node1");
        rec.apply(&desired);
        r.changes(1, 1);
        r.pending(2, 3);
        let text = r.render();
        assert_eq!(
            value(&text, "kubeproxy_sync_proxy_rules_service_changes_pending"),
            Some(2.0)
        );
        r.pass(PassKind::Full, Duration::from_millis(3), &rec, 1);
        r.pass(PassKind::Incremental, Duration::from_millis(1), &rec, 1);
        r.audit_drift(0, 2);
        r.conntrack(500, 1000);
        r.event("InvalidObject", EventResult::Published);
        r.watch_failed("Service");
        r.relisted("EndpointSlice");
        let text = r.render();
        let expect = [
            ("kubeproxy_sync_proxy_rules_duration_seconds_count", 2.0),
            (
                "kubeproxy_sync_full_proxy_rules_duration_seconds_count",
                1.0,
            ),
            (
                "kubeproxy_sync_partial_proxy_rules_duration_seconds_count",
                1.0,
            ),
            (
                "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.004\"}",
                2.0,
            ),
            (
                "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.002\"}",
                1.0,
            ),
            ("kubeproxy_sync_proxy_rules_service_changes_total", 1.0),
            ("kubeproxy_sync_proxy_rules_endpoint_changes_total", 1.0),
            ("kubeproxy_sync_proxy_rules_service_changes_pending", 0.0),
            ("svc_passes_total{kind=\"full\"}", 1.0),
            ("svc_passes_total{kind=\"incremental\"}", 1.0),
            ("svc_passes_total{kind=\"audit\"}", 0.0),
            ("svc_audit_drift_total{part=\"maps\"}", 2.0),
            ("svc_frontends{state=\"programmed\"}", 1.0),
            ("svc_frontends{state=\"waiting\"}", 0.0),
            ("svc_backends_programmed", 2.0),
            ("svc_bad_objects", 1.0),
            // A frontend and its two slots.
            ("svc_map_entries{map=\"SERVICES_V1\"}", 3.0),
            ("svc_map_max_entries{map=\"SERVICES_V1\"}", 1000.0),
            ("svc_map_fill_ratio{map=\"SERVICES_V1\"}", 0.003),
            ("svc_map_fill_ratio{map=\"BACKENDS_V1\"}", 0.002),
            ("svc_map_fill_ratio{map=\"CT_V1\"}", 0.5),
            (
                "svc_events_total{reason=\"InvalidObject\",result=\"published\"}",
                1.0,
            ),
            ("svc_watch_failures_total{kind=\"Service\"}", 1.0),
            ("svc_watch_relists_total{kind=\"EndpointSlice\"}", 1.0),
        ];
        for (series, want) in expect {
            assert_eq!(value(&text, series), Some(want), "{series} in:\n{text}");
        }
        let last = value(&text, "kubeproxy_sync_proxy_rules_last_timestamp_seconds").unwrap();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(now - last < 60.0 && last <= now, "{last} vs {now}");
        assert!(
            text.contains("# UNIT kubeproxy_sync_proxy_rules_duration_seconds seconds"),
            "{text}"
        );
        // The pass made programming fresh.
        assert!(r.health().check().fresh);
    }

    #[test]
    fn network_programming_latency_counts_only_changes_made_since_the_start() {
        let r = Recorder::default();
        r.programmed_change(SystemTime::now() - Duration::from_hours(1));
        let text = r.render();
        assert_eq!(
            value(
                &text,
                "kubeproxy_network_programming_duration_seconds_count"
            ),
            Some(0.0)
        );
        std::thread::sleep(Duration::from_millis(5));
        r.programmed_change(SystemTime::now() - Duration::from_millis(2));
        let text = r.render();
        assert_eq!(
            value(
                &text,
                "kubeproxy_network_programming_duration_seconds_count"
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &text,
                "kubeproxy_network_programming_duration_seconds_bucket{le=\"0.25\"}"
            ),
            Some(1.0)
        );
    }

    #[test]
    fn probes_are_counted_by_code() {
        let r = Recorder::default();
        assert_eq!(r.probe(crate::health::Probe::Healthz).0, 503);
        r.up_to_date();
        assert_eq!(r.probe(crate::health::Probe::Healthz).0, 200);
        assert_eq!(r.probe(crate::health::Probe::Livez).0, 200);
        let text = r.render();
        assert_eq!(
            value(&text, "kubeproxy_healthz_total{code=\"503\"}"),
            Some(1.0)
        );
        assert_eq!(
            value(&text, "kubeproxy_healthz_total{code=\"200\"}"),
            Some(1.0)
        );
        assert_eq!(
            value(&text, "kubeproxy_livez_total{code=\"200\"}"),
            Some(1.0)
        );
    }
}
